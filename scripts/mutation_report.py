#!/usr/bin/env python
"""The mutation score of the last `mutmut run` (scripts/mutation_score.sh): mutants by status
from `mutmut results --all true`, the score killed / (killed + survived), and the survivors by
name, written to docs/data/mutation.json (or --out) with the commit. A timeout is not a kill:
read one with `mutmut show NAME`."""
import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

from scripts import CHECKOUT
from sim.provenance import stamp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "data" / "mutation.json")
    args = parser.parse_args(argv)
    listing = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "results", "--all", "true"],
                             cwd=CHECKOUT, capture_output=True, text=True, check=True).stdout
    status = dict(line.strip().rsplit(": ", 1) for line in listing.splitlines() if ": " in line)
    count = collections.Counter(status.values())
    judged = count["killed"] + count["survived"]
    if not judged:
        print("mutation_report: no judged mutants: run scripts/mutation_score.sh first", file=sys.stderr)
        return 2
    score = count["killed"] / judged
    args.out.write_text(json.dumps({**stamp(), "counts": dict(count), "score": score,
                                    "survivors": sorted(n for n, s in status.items() if s == "survived")},
                                   indent=2, sort_keys=True) + "\n")
    for state, n in sorted(count.items()):
        print(f"{state:12s} {n}")
    print(f"mutation score: {score:.1%} ({count['killed']} killed of {judged} killed or survived; "
          f"{count['timeout']} timeouts not counted); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
