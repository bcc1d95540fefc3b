#!/usr/bin/env python
"""`matsim fuzz --impl` against the two implementations in this repository that share no code
with matsim: the numpy one (vectors/numpy_impl) and DeMo's reference optimizer
(vectors/demo_impl, with $MATSIM_DEMO naming demo.py; held to Psyche's reading, whose DisTrO is
DeMo's). Per op: cases tried, unsupported, passed, mismatches (each shrunk and kept under
--out as a one-case vectors directory), errors. Writes docs/data/fuzz_impl.json with the commit.

    MATSIM_DEMO=/path/to/demo.py .venv/bin/python -m scripts.fuzz_impl --seconds 60
"""
import argparse
import json
import os
import sys
from pathlib import Path

from scripts import CHECKOUT
from sim import fuzz
from sim.provenance import stamp

ADAPTERS = {"numpy": ("vectors/numpy_impl/adapter.py", "matsim"), "demo": ("vectors/demo_impl/adapter.py", "psyche")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per op")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CHECKOUT / "results" / "fuzz-impl")
    parser.add_argument("--data", type=Path, default=CHECKOUT / "docs" / "data" / "fuzz_impl.json")
    args = parser.parse_args(argv)
    provenance, runs = stamp(), {}
    for name, (adapter, reading) in ADAPTERS.items():
        if name == "demo" and not os.environ.get("MATSIM_DEMO"):
            print("demo: skipped: set MATSIM_DEMO to DeMo's demo.py")
            continue
        reports = fuzz.fuzz(f"{sys.executable} {CHECKOUT / adapter}", None, args.seconds, reading, args.seed,
                            args.out / name, args.out / name / "db", echo=print)
        listed = [r for r in reports if not r.skipped]
        runs[name] = {"reading": reading, "seconds_per_op": args.seconds,
                      "ops": [{k: v for k, v in r.__dict__.items() if k != "found"} | {"found": len(r.found)}
                              for r in listed],
                      "found": [f | {"op": r.op} for r in listed for f in r.found]}
        for f in runs[name]["found"]:
            f["directory"] = str(Path(f["directory"]).relative_to(CHECKOUT)) if CHECKOUT in Path(f["directory"]).parents \
                else Path(f["directory"]).name
            f["replay"] = (f"matsim vectors check {f['directory']} --impl 'python {adapter}'"
                           + (" --reading psyche" if reading == "psyche" else ""))
    args.data.write_text(json.dumps({**provenance, "seed": args.seed, "runs": runs}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
