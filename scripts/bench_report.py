#!/usr/bin/env python
"""The benchmarks as the docs publish them: run `benchmarks/` under pytest-benchmark (as `make
bench` does), then write docs/data/bench.json (or --out) with the commit: every benchmark's
median and extra figures, and each group's ratios against its bare baseline measured in the
same run (a benchmark named "baseline" or "bare"; the engine's and the harness's interleaved
ratios come from the benchmarks themselves, each pair timed together).

    .venv/bin/python -m scripts.bench_report                 # every benchmark (about 10 minutes on 2 cores)
    .venv/bin/python -m scripts.bench_report -k engine       # a pytest selection

Speed is measured here, never asserted in a test (house rule 6).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts import CHECKOUT
from sim.provenance import stamp

BASELINE_WORDS = ("baseline", "bare")


def summarize(raw: dict) -> list[dict]:
    """One row per benchmark: its group, name, median seconds, extra figures, and its median
    over its group's baseline (None for the baseline itself, or a group without one)."""
    rows = [{"group": b["group"], "name": b["name"], "median_s": b["stats"]["median"], "extra": b.get("extra_info", {})}
            for b in raw["benchmarks"]]
    for row in rows:
        baseline = next((r for r in rows if r["group"] == row["group"] and r is not row
                         and any(w in r["name"] for w in BASELINE_WORDS)), None)
        is_baseline = any(w in row["name"] for w in BASELINE_WORDS)
        row["over_baseline"] = None if is_baseline or baseline is None else row["median_s"] / baseline["median_s"]
        row["baseline"] = None if is_baseline or baseline is None else baseline["name"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", help="a pytest -k selection of benchmarks")
    parser.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "data" / "bench.json")
    args = parser.parse_args(argv)
    provenance = stamp()   # the checkout as the benchmarks import it
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        command = [sys.executable, "-m", "pytest", "benchmarks", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                   "--benchmark-only", f"--benchmark-json={raw_path}", *(["-k", args.k] if args.k else [])]
        run = subprocess.run(command, cwd=CHECKOUT)
        if run.returncode != 0 or not raw_path.is_file():
            print(f"bench_report: the benchmarks failed (exit {run.returncode}); nothing written", file=sys.stderr)
            return 1
        raw = json.loads(raw_path.read_text())
    rows = summarize(raw)
    cpu = raw.get("machine_info", {}).get("cpu", {}).get("brand_raw")
    args.out.write_text(json.dumps({**provenance, "cpu_model": cpu, "selection": args.k, "benchmarks": rows},
                                   indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({len(rows)} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
