#!/usr/bin/env python
"""Measure the round-off the exact reference's bounds must admit: over random cases of the
reference properties' own strategy, every aggregate's error against the reference, as a
fraction of its scale (the size of what went into it), per mode and dtype. Writes
results/round_off.json with the commit it measured.

    .venv/bin/python -m scripts.round_off --examples 300
"""
import argparse
import json
from pathlib import Path

from hypothesis import HealthCheck, Phase, find, settings

from properties import test_reference as ref
from sim.provenance import stamp


def measure(lossless: bool, dtype: str, examples: int, seed: int) -> dict:
    observed, cases = [], [0]

    def run(case):
        case = {**case, "dtype": dtype}
        play = ref.lossless_reference(case) if lossless else ref.compressed_reference(case)
        ref.play(case, play, observed)
        cases[0] += 1
        return False

    try:
        find(ref.reference_runs(lossless=lossless), run, settings=settings(
            max_examples=examples, database=None, phases=[Phase.generate], deadline=None,
            suppress_health_check=list(HealthCheck)), random=__import__("random").Random(seed))
    except Exception as err:   # NoSuchExample once every example ran; an assertion is a finding
        if type(err).__name__ != "NoSuchExample":
            raise
    observed.sort()
    return {"cases": cases[0], "aggregates": len(observed), "max": observed[-1] if observed else 0.0,
            "p99": observed[int(0.99 * (len(observed) - 1))] if observed else 0.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/data/round_off.json")
    args = parser.parse_args()
    table = {}
    for mode, lossless in (("lossless", True), ("compressed", False)):
        for dtype in ("float64", "float32"):
            table[f"{mode}/{dtype}"] = row = measure(lossless, dtype, args.examples, args.seed)
            print(f"{mode:10s} {dtype}: {row['cases']} cases, {row['aggregates']} aggregates, error/scale max "
                  f"{row['max']:.3g}, p99 {row['p99']:.3g} (bound {ref.ROUND_OFF[ref.DTYPES[dtype]]:.0e})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**stamp(), "examples": args.examples, "seed": args.seed,
                                          "bounds": {k: ref.ROUND_OFF[v] for k, v in ref.DTYPES.items()},
                                          "measured": table}, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
