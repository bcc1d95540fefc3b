#!/usr/bin/env python
"""Which planted bugs a run meets: plant each run-level bug of the catalog in turn and ask
whether a short run changes (its records or its final weights), with batching as default
runs take it (auto) and with batching off. Three tiny scenarios between them use every mode
the catalog's bugs live in, with two peers of every shape: (A) clipping, weight decay, a batch ramp, cold start, helpers,
late/drop/churn faults under SGD; (B) 1-bit with Psyche's sent zeros under sign-SGD; (C)
plain mixed tiers under SGD. Writes docs/data/bug_paths.json (or --out) with the commit:
per bug, the scenarios whose run it changes with batching auto ("default") and off.
A churned peer may train alone for a round (a group of one), so A also reaches the path of
a lone peer under auto; B and C batch every peer.

    .venv/bin/python -m scripts.bug_paths                                  # this checkout
    .venv/bin/python -m scripts.bug_paths --checkout OLD --out docs/data/bug_paths_before.json

--checkout measures another checkout (an earlier commit: its sim/ and tests/ are imported
in a child process), so a fix shows as before and after. A measurement, never a test:
tests/test_bug_paths.py is the check that holds at HEAD.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

from scripts import CHECKOUT, in_checkout

SCENARIOS = "ABC"
BATCHING = ("auto", "off")
ROUNDS = 6


def scenarios():
    from sim.config import load_config
    tiny = load_config("tiny")
    distro = lambda **kw: dataclasses.replace(tiny.distro, **kw)
    ramp = tiny.replace(distro=distro(quantize_1bit=False, clip_grad_norm=0.5, weight_decay=0.1),
                        global_batch_size=4, global_batch_size_end=8, global_batch_size_warmup_tokens=160,
                        cold_start_warmup_steps=2)
    # Two peers of every shape: under auto every peer trains in a batch (a lone peer trains alone).
    return {"A": (ramp, [0, 0, 1, 1, 2, 2], [0, 0, 0.5, 0.5, 0, 0], "late=0.15,drop=0.1,churn=0.15", "SGD"),
            "B": (tiny.replace(distro=distro(quantize_1bit=True, zero_blocks="sent")), [0, 0, 1, 1], [0] * 4, "", "SIGN"),
            "C": (tiny.replace(distro=distro(quantize_1bit=False)), [0, 0, 1, 1], [0] * 4, "", "SGD")}


def run_once(scenario, batching: str, seed: int):
    import inspect

    from sim.aggregate import ApplyRule
    from sim.run import simulate
    config, tiers, helpers, faults, rule = scenario
    kwargs = dict(faults=faults, seed=seed, rounds=ROUNDS, device="cpu", batching=batching, eval_every=1,
                  apply_rule=ApplyRule[rule])
    if "weight_decay" in inspect.signature(simulate).parameters:   # older checkouts took it apart
        kwargs["weight_decay"] = config.distro.weight_decay
    result = simulate(config, tiers, helpers, **kwargs)
    return json.dumps(result.records, sort_keys=True), result.final_weights


def run_level_bugs(catalog) -> list[str]:
    """The catalog's bugs that live in a run (not in one op a property calls alone)."""
    groups = ("INTEGRATION", "METRICS", "PSYCHE", "BATCHED", "REFERENCE_MODES")
    chosen = set().union(*(getattr(catalog, g, ()) for g in groups))
    chosen |= {b for b in catalog.BUGS if b.startswith("batched")}
    return sorted(b for b in catalog.BUGS if b in chosen)


def measure(seed: int) -> dict:
    """In the checkout on sys.path: {bug: {"A-auto": changed, ...}}."""
    import pytest
    import torch

    import tests.planted_bugs as catalog
    torch.set_num_threads(1)
    cases = scenarios()
    honest = {(s, b): run_once(cases[s], b, seed) for s in SCENARIOS for b in BATCHING}
    differs = lambda a, b: a[0] != b[0] or any(not torch.equal(a[1][n], b[1][n]) for n in a[1])
    table = {}
    for bug in run_level_bugs(catalog):
        patch = pytest.MonkeyPatch()
        catalog.plant(patch, bug)
        try:
            table[bug] = {f"{s}-{b}": differs(run_once(cases[s], b, seed), honest[(s, b)])
                          for s in SCENARIOS for b in BATCHING}
        except Exception as err:   # a bug that crashes the run changed it
            table[bug] = {f"{s}-{b}": True for s in SCENARIOS for b in BATCHING} | {"crashed": repr(err)[:200]}
        finally:
            patch.undo()
        print(f"{bug:50s} changes: default " + "".join(s for s in SCENARIOS if table[bug][f"{s}-auto"]).ljust(4)
              + "off " + "".join(s for s in SCENARIOS if table[bug][f"{s}-off"]), file=sys.stderr, flush=True)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=CHECKOUT, help="the checkout to measure (default: this one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "data" / "bug_paths.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.seed)))
        return 0
    from sim.provenance import stamp
    checkout = args.checkout.resolve()
    table = json.loads(in_checkout(checkout, "scripts.bug_paths", ["--seed", str(args.seed)]))
    out = {**stamp(checkout), "seed": args.seed, "rounds": ROUNDS, "scenarios": SCENARIOS,
           "bugs": {bug: {"default": "".join(s for s in SCENARIOS if row[f"{s}-auto"]),
                          "off": "".join(s for s in SCENARIOS if row[f"{s}-off"]), **row} for bug, row in table.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
