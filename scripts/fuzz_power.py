#!/usr/bin/env python
"""The power of `matsim fuzz --impl`: for each planted bug that lives in an exported op
(the bugs of sim/vectors/killers.json), fuzz matsim's reference adapter with that bug planted
(tests/planted_adapter.py) on that op, and record the time to the first mismatch, the
examples tried before it, and the size of the shrunk input (non-zero elements and peers)
beside the killing case that `scripts/pin_killers.py` found with Hypothesis's `find`.
Writes docs/data/fuzz_power.json (or --out) with the commit.

    .venv/bin/python -m scripts.fuzz_power [--seconds 60] [--bugs a,b]

Each bug is fuzzed in a fresh example database, with its own seed, so a mismatch found for
one bug is never replayed for another.
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from scripts import CHECKOUT
from sim import fuzz
from sim.provenance import stamp
from sim.vectors.cases import KILLERS, _killers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="budget per bug (it stops at the first mismatch)")
    parser.add_argument("--bugs", help="comma-separated (default: every bug of killers.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "data" / "fuzz_power.json")
    args = parser.parse_args(argv)
    killers = {flags[-1].removeprefix("kills:"): (op, inputs) for op, inputs, flags, _ in _killers()}
    if not killers:
        print(f"fuzz_power: {KILLERS} is missing: run python -m scripts.pin_killers", file=sys.stderr)
        return 2
    bugs = args.bugs.split(",") if args.bugs else sorted(killers)
    provenance, rows = stamp(), {}
    for bug in bugs:
        op, killing = killers[bug]
        with tempfile.TemporaryDirectory() as tmp:
            (report,) = fuzz.fuzz(f"{sys.executable} -m tests.planted_adapter {bug}", [op], args.seconds, "matsim",
                                  args.seed, Path(tmp) / "found", Path(tmp) / "db", echo=lambda line: None)
        found = report.found[0] if report.found else None
        elements, peers = fuzz.size_of(killing)
        rows[bug] = {"op": op, "first_mismatch_s": report.first_mismatch_s, "tried": report.tried_to_first_mismatch,
                     "shrunk_elements": found and found["elements"], "shrunk_peers": found and found["peers"],
                     "killer_elements": elements, "killer_peers": peers}
        print(f"{bug:48s} {op:18s} " + ("missed" if report.first_mismatch_s is None else
              f"{report.first_mismatch_s:6.1f} s, shrunk to {found['elements']} elements / {found['peers']} peers "
              f"(killing case {elements} / {peers})"), flush=True)
    times = [r["first_mismatch_s"] for r in rows.values() if r["first_mismatch_s"] is not None]
    summary = {"found": len(times), "bugs": len(rows), "median_s": statistics.median(times) if times else None}
    args.out.write_text(json.dumps({**provenance, "seconds": args.seconds, "seed": args.seed, **summary, "rows": rows},
                                   indent=2, sort_keys=True) + "\n")
    print(f"found {summary['found']} of {summary['bugs']}, median {summary['median_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
