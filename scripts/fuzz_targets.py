#!/usr/bin/env python
"""The properties HypoFuzz fuzzes, in shards that rotate from run to run (scripts/fuzz.sh).

HypoFuzz works through a few targets at a time from the same start, so a short campaign over
every property reaches few of them. Sharded, each HypoFuzz process gets a handful of targets
for a slice of the budget, and the order rotates with a seed (the date by default, so every
night starts elsewhere). Prints one shard per line: its pytest node ids, space-separated.

    .venv/bin/python -m scripts.fuzz_targets --shards 8 [--seed 20261205] [pytest selection]
"""
import argparse
import datetime
import random
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--seed", default=datetime.date.today().strftime("%Y%m%d"))
    parser.add_argument("selection", nargs="*", default=["properties/"])
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error(f"--shards {args.shards} is invalid: expected an integer >= 1")
    from hypofuzz.collection import collect_tests
    targets = sorted(t.nodeid for t in collect_tests(args.selection).fuzz_targets)
    random.Random(str(args.seed)).shuffle(targets)
    shards = min(args.shards, len(targets))
    for i in range(shards):
        print(" ".join(targets[i::shards]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
