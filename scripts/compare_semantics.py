#!/usr/bin/env python
"""How often PEER_MEAN (Psyche's heterogeneous normalization) and COEFF_MEAN
(batch_decompress "mean") disagree on the sign of the applied update, on real
gradients: peers of the given tiers each train one shard of a config, compress
with DisTrO, and a full-width receiver aggregates under both semantics.

    .venv/bin/python -m scripts.compare_semantics --config-path nanogpt-20m-run --tiers 0,1,1
"""
import argparse

from sim.aggregate import MeanSemantics, aggregate
from sim.config import load_config
from sim.distro import DistroState
from sim.model import build_model, full_shapes, random_tokens
from sim.peer import train_and_compress
from sim.tiers import parse_int_list


def sign_disagreement(config_path: str, tiers: tuple[int, ...], seed: int = 0, batch: int = 1) -> dict:
    cfg = load_config(config_path)
    payloads = []
    for peer, tier in enumerate(tiers):
        model = build_model(cfg.model, tier, seed=seed, device="cpu")
        tokens = random_tokens(cfg.model, batch, cfg.seq_len + 1, seed=seed * 1000 + peer, device="cpu")
        payload, _ = train_and_compress(model, DistroState.fresh(cfg.distro), tokens, cfg.lr_schedule.base_lr, peer, 0)
        payloads.append(payload)
    shapes = full_shapes(cfg.model)
    coeff = aggregate(payloads, shapes, cfg.distro, MeanSemantics.COEFF_MEAN).updates
    peer = aggregate(payloads, shapes, cfg.distro, MeanSemantics.PEER_MEAN).updates
    differ = sum(int((coeff[n].sign() != peer[n].sign()).sum()) for n in shapes)
    nonzero = sum(int(((coeff[n] != 0) | (peer[n] != 0)).sum()) for n in shapes)
    return {"elements": sum(c.numel() for c in coeff.values()), "updated": nonzero, "sign_differs": differ,
            "fraction": differ / max(1, nonzero)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-path", default="nanogpt-20m-run")
    parser.add_argument("--tiers", default="0,1,1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = sign_disagreement(args.config_path, parse_int_list(args.tiers, "--tiers"), args.seed)
    print(f"{args.config_path} tiers {args.tiers}: sign of the applied update differs on "
          f"{result['sign_differs']:,} of {result['updated']:,} updated elements ({result['fraction']:.2%})")
