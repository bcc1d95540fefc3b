#!/usr/bin/env python
"""Bytes on the wire per round: a mix of tiers against an all-tier-0 network.

Payload sizes are measured by encoding real payloads (sim/wire.py), so index
and sign overheads are counted. Default: the chapter's 8 tier-0 + 24 tier-1
peers against 32 tier-0, on nanogpt-20m-run and on llama 1B / 7B shapes.

    .venv/bin/python -m scripts.bandwidth
"""
import argparse

from rich.table import Table

from sim.config import DistroConfig, ModelConfig, load_config
from sim.model import local_shapes, param_count
from sim.scenario import console
from sim.wire import dense_bytes, payload_size

LLAMA = {  # public llama shapes (TinyLlama-1.1B, Llama-2-7B)
    "llama-1b": ModelConfig("llama", 32000, 2048, 5632, 22, 32, 4),
    "llama-7b": ModelConfig("llama", 32000, 4096, 11008, 32, 32, 32),
}


def round_bytes(model: ModelConfig, distro: DistroConfig, counts: dict[int, int]) -> int:
    """Uploaded bytes per round for {tier: peers}."""
    return sum(n * payload_size(model, distro, (tier,) * model.num_hidden_layers) for tier, n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-path", default="nanogpt-20m-run")
    parser.add_argument("--tier0", type=int, default=8)
    parser.add_argument("--tier1", type=int, default=24)
    args = parser.parse_args()
    run = load_config(args.config_path)
    models = {run.name: run.model, **LLAMA}
    table = Table("model", "params", "MLP share", "tier-0 payload", "tier-1 payload", "ratio vs fp32",
                  f"{args.tier0}xT0+{args.tier1}xT1 vs {args.tier0 + args.tier1}xT0")
    for name, model in models.items():
        layers = model.num_hidden_layers
        full, half = param_count(model, 0), param_count(model, 1)
        mlp_share = 2 * (full - half) / full
        t0, t1 = (payload_size(model, run.distro, (t,) * layers) for t in (0, 1))
        mixed = round_bytes(model, run.distro, {0: args.tier0, 1: args.tier1})
        homogeneous = round_bytes(model, run.distro, {0: args.tier0 + args.tier1})
        table.add_row(name, f"{full / 1e6:,.1f}M", f"{mlp_share:.0%}", f"{t0:,} B", f"{t1:,} B",
                      f"{dense_bytes(local_shapes(model, 0)) / t0:.0f}x", f"-{1 - mixed / homogeneous:.1%}")
    console().print(table)


if __name__ == "__main__":
    main()
