#!/usr/bin/env python
"""Bytes on the wire per round: a mix of tiers against an all-tier-0 network.

Payload sizes are measured by encoding real payloads (sim/wire.py), so index
and sign overheads are counted. Default: the chapter's 8 tier-0 + 24 tier-1
peers against 32 tier-0, on nanogpt-20m-run and on llama 1B / 7B shapes. Writes
docs/data/bandwidth.json (or --out) with the commit.

    .venv/bin/python -m scripts.bandwidth
"""
import argparse
import json
from pathlib import Path

from rich.table import Table

from scripts import CHECKOUT
from sim.config import DistroConfig, ModelConfig, load_config
from sim.memory import LLAMA_SHAPES
from sim.model import local_shapes, param_count
from sim.provenance import stamp
from sim.scenario import console
from sim.wire import dense_bytes, payload_size


def round_bytes(model: ModelConfig, distro: DistroConfig, counts: dict[int, int]) -> int:
    """Uploaded bytes per round for {tier: peers}."""
    return sum(n * payload_size(model, distro, (tier,) * model.num_hidden_layers) for tier, n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-path", default="nanogpt-20m-run")
    parser.add_argument("--tier0", type=int, default=8)
    parser.add_argument("--tier1", type=int, default=24)
    parser.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "data" / "bandwidth.json")
    args = parser.parse_args()
    run = load_config(args.config_path)
    models = {run.name: run.model, **{name: model for name, (model, _, _) in LLAMA_SHAPES.items()}}
    rows = []
    table = Table("model", "params", "MLP share", "tier-0 payload", "tier-1 payload", "ratio vs fp32",
                  f"{args.tier0}xT0+{args.tier1}xT1 vs {args.tier0 + args.tier1}xT0")
    for name, model in models.items():
        layers = model.num_hidden_layers
        full, half = param_count(model, 0), param_count(model, 1)
        mlp_share = 2 * (full - half) / full
        t0, t1 = (payload_size(model, run.distro, (t,) * layers) for t in (0, 1))
        mixed = round_bytes(model, run.distro, {0: args.tier0, 1: args.tier1})
        homogeneous = round_bytes(model, run.distro, {0: args.tier0 + args.tier1})
        dense = dense_bytes(local_shapes(model, 0))
        table.add_row(name, f"{full / 1e6:,.1f}M", f"{mlp_share:.0%}", f"{t0:,} B", f"{t1:,} B",
                      f"{dense / t0:.0f}x", f"-{1 - mixed / homogeneous:.1%}")
        rows.append({"model": name, "params": full, "mlp_share": mlp_share, "tier0_bytes": t0, "tier1_bytes": t1,
                     "dense_fp32_bytes": dense, "mixed_round_bytes": mixed, "tier0_round_bytes": homogeneous})
    console().print(table)
    args.out.write_text(json.dumps({**stamp(), "tier0": args.tier0, "tier1": args.tier1, "chunk":
                                    run.distro.compression_chunk, "topk": run.distro.compression_topk, "models": rows},
                                   indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
