#!/usr/bin/env python
"""Calibrate the whole-run property's learning claim (properties/test_runs.py): over cases of
its own strategy, the held-out loss a run under faults ends above the same seed's fault-free
run, against what its faults cost in rounds' worth of payloads (sim.oracle.fault_cost). The
bound is per round, gap <= c * cost (a run whose faults cost nothing is the fault-free run): c
is fitted on the first half of the cases as the largest gap per round seen there, times
`--margin`; the false-alarm rate is measured on the other half. Writes docs/data/fault_gap.json with the commit it measured.

    .venv/bin/python -m scripts.calibrate_faults --cases 400
"""
import argparse
import json
import random
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, find, settings

from properties import test_runs
from sim.oracle import fault_cost
from sim.provenance import stamp


def draw_cases(count: int, seed: int) -> list:
    """The first `count` cases the property's strategy draws from `seed`, in order."""
    cases = []

    def keep(case):
        if len(cases) < count:
            cases.append(case)
        return len(cases) >= count

    find(test_runs.runs(), keep, settings=settings(max_examples=10 * count, database=None, phases=[Phase.generate],
                                                   suppress_health_check=list(HealthCheck)),
         random=random.Random(seed))
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400, help="cases in all: half fit the bound, half test it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=1.5)
    parser.add_argument("--out", default="docs/data/fault_gap.json")
    args = parser.parse_args()
    start, rows = time.perf_counter(), []
    for i, case in enumerate(draw_cases(args.cases, args.seed)):
        run, clean = test_runs.play_pair(case)
        tiers, fractions, spec, seed = case
        rows.append({"tiers": [list(t) if isinstance(t, tuple) else t for t in tiers], "fractions": fractions,
                     "faults": spec, "seed": seed, "cost": fault_cost(run, clean),
                     "gap": run.final_eval_loss - clean.final_eval_loss})
        if (i + 1) % 50 == 0:
            print(f"{i + 1} cases, {time.perf_counter() - start:.0f} s", flush=True)
    fit, test = rows[: len(rows) // 2], rows[len(rows) // 2:]
    per_round = max(r["gap"] / r["cost"] for r in fit if r["cost"]) * args.margin
    alarms = [r for r in test if r["gap"] > per_round * r["cost"]]
    costless_moved = [r for r in rows if not r["cost"] and r["gap"] != 0]
    result = {**stamp(), "cases": len(rows), "seed": args.seed, "margin": args.margin,
              "bound": {"per_round": per_round},
              "fit": {"cases": len(fit), "largest_gap_per_round": per_round / args.margin},
              "test": {"cases": len(test), "false_alarms": len(alarms),
                       "false_alarm_rate": len(alarms) / len(test)},
              "costing_nothing_moved": len(costless_moved), "seconds": time.perf_counter() - start, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"bound: {per_round:.5f} of held-out loss per round's worth of payloads lost (fitted on {len(fit)} cases, margin "
          f"{args.margin}); false alarms on the other {len(test)}: {len(alarms)} ({len(alarms) / len(test):.1%})")


if __name__ == "__main__":
    main()
