"""HypoFuzz's coverage-guided search against Hypothesis's random generation (the nightly
profile's engine), on the same time budget, one property at a time (README table).

- coverage: every @given property of properties/ (each parametrized case) runs SECONDS under
  each engine on the honest code; counted: distinct line-to-line transitions in sim/ (HypoFuzz's
  own tracer measures both engines, so random pays the same tracing cost HypoFuzz does) and
  examples run.
- detection: each planted bug of tests/planted_bugs.py, planted alone, and its catcher
  properties under each engine until the first failing example (no shrinking) or DETECT
  seconds; random runs untraced, as the nightly job runs it.

    .venv/bin/python -m scripts.fuzz_vs_random [--seconds 10] [--detect 60] [--jobs N] [--out docs/data]

Both engines are seeded (--seed): the same command gives the same examples, though what fits
in a time budget depends on the machine's speed.
"""
import argparse
import functools
import importlib
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from scripts import CHECKOUT as REPO
from sim.provenance import stamp

SIM = str(REPO / "sim")


# What a failing property raises: an exception, or pytest.fail's Failed (a BaseException).
FAILURES = (Exception, pytest.fail.Exception)


class OutOfTime(BaseException):
    """Ends a random run at its budget: not an Exception, so Hypothesis does not take it for a failure."""


def _worker() -> None:
    import warnings

    import torch
    from hypothesis.errors import HypothesisWarning
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=HypothesisWarning)  # "Generating overly large repr"


def property_targets() -> list[tuple]:
    """Every @given property as (label, module, test, case): case is the index of one value of
    a one-argument parametrize, or None (state machines are driven by pytest's unittest
    integration, not @given, and are left out)."""
    targets = []
    for path in sorted((REPO / "properties").glob("test_*.py")):
        module = importlib.import_module(f"properties.{path.stem}")
        for name, test in vars(module).items():
            if not (name.startswith("test_") and hasattr(test, "hypothesis")):
                continue
            marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
            if not marks:
                targets.append((f"{path.stem}::{name}", path.stem, name, None))
            elif len(marks) == 1 and "," not in marks[0].args[0]:
                targets += [(f"{path.stem}::{name}[{marks[0].args[0]}={value}]", path.stem, name, index)
                            for index, value in enumerate(marks[0].args[1])]
    return targets


def _resolve(module: str, name: str, case: int | None):
    test = getattr(importlib.import_module(f"properties.{module}"), name)
    if case is None:
        return test, {}
    (mark,) = [m for m in test.pytestmark if m.name == "parametrize"]
    return test, {mark.args[0]: mark.args[1][case]}


def _sim_branches(branches) -> set:
    return {(b.start.filename, b.start.line, b.end.filename, b.end.line) for b in branches
            if b.start.filename.startswith(SIM) or b.end.filename.startswith(SIM)}


def run_random(test, case: dict, seconds: float, seed: int, trace: bool) -> dict:
    """Hypothesis's own generation (no database, no explicit examples, no shrinking) until the
    first failure or `seconds`."""
    from hypofuzz.coverage import CoverageCollector
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.errors import UnsatisfiedAssumption

    inner = test.hypothesis.inner_test
    start = time.perf_counter()
    seen = {"examples": 0, "found_at": None, "branches": set()}

    @functools.wraps(inner)
    def timed(*args, **kwargs):
        if seen["examples"] and time.perf_counter() - start > seconds:   # at least one example, as HypoFuzz
            raise OutOfTime
        seen["examples"] += 1
        try:
            if not trace:
                return inner(*args, **kwargs)
            collector = CoverageCollector()
            try:
                with collector:
                    return inner(*args, **kwargs)
            finally:  # read once the tracer is off: it would add to the set while we read it
                seen["branches"] |= _sim_branches(collector.branches)
        except UnsatisfiedAssumption:   # assume(False): a rejected example, not a failure
            raise
        except FAILURES:
            if seen["found_at"] is None:
                seen["found_at"] = time.perf_counter() - start
            raise

    own = test._hypothesis_internal_use_settings
    saved = (inner, own, getattr(test, "_hypothesis_internal_use_seed", None))
    test.hypothesis.inner_test = timed
    test._hypothesis_internal_use_settings = settings(
        own, database=None, phases=[Phase.generate], max_examples=10**9, deadline=None,
        report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
    test._hypothesis_internal_use_seed = seed
    try:
        test(**case)
        exhausted = True
    except OutOfTime:
        exhausted = False
    except FAILURES:  # the failure, already timed
        exhausted = False
    finally:
        test.hypothesis.inner_test, test._hypothesis_internal_use_settings, test._hypothesis_internal_use_seed = saved
    return {"examples": seen["examples"], "found_at": seen["found_at"], "branches": len(seen["branches"]),
            "exhausted": exhausted}


class Found(Exception):
    pass


def run_hypofuzz(test, case: dict, seconds: float, seed: int) -> dict:
    """HypoFuzz's engine (its provider, corpus and mutator) on one target until the first failure
    or `seconds`; its failures are not shrunk here (detection is the question)."""
    import random

    from hypofuzz.coverage import CoverageCollector
    from hypofuzz.database import HypofuzzDatabase
    from hypofuzz.hypofuzz import FuzzTarget
    from hypothesis.database import InMemoryExampleDatabase
    from hypothesis.internal.conjecture.data import Status

    target = FuzzTarget.from_hypothesis_test(test, database=HypofuzzDatabase(InMemoryExampleDatabase()),
                                             extra_kwargs=case)
    target.random = random.Random(seed)
    collector = target.provider.collector = CoverageCollector()   # HypoFuzz's own tracer, reused per example
    execute = target._execute_once
    seen = {"examples": 0, "found_at": None, "branches": set()}
    start = time.perf_counter()

    def counted(data, **kwargs):
        seen["examples"] += 1
        execute(data, **kwargs)
        seen["branches"] |= _sim_branches(collector.branches)   # this example's, as HypoFuzz's tracer saw them
        if data.status is Status.INTERESTING:
            seen["found_at"] = time.perf_counter() - start
            raise Found

    target._execute_once = counted
    target._enter_fixtures()
    try:
        while time.perf_counter() - start < seconds:
            target.run_one()
    except Found:
        pass
    return {"examples": seen["examples"], "found_at": seen["found_at"], "branches": len(seen["branches"])}


def coverage_job(target: tuple, seconds: float, seed: int) -> dict:
    label, module, name, case = target
    test, kwargs = _resolve(module, name, case)
    run_random(test, kwargs, 1.0, seed + 1, trace=False)  # warm (its first example's lazy imports), untimed
    return {"target": label, "random": run_random(test, kwargs, seconds, seed, trace=True),
            "hypofuzz": run_hypofuzz(test, kwargs, seconds, seed)}


def detection_job(bug: str, seconds: float, seed: int) -> dict:
    from tests.planted_bugs import CATCHERS, plant, property_function
    result = {"bug": bug}
    for ref in CATCHERS[bug]:  # warm, on the honest code: imports and caches, untimed
        run_random(*property_function(ref), 1.0, seed + 1, trace=False)
    for engine in ("random", "hypofuzz"):
        start, found = time.perf_counter(), None
        for ref in CATCHERS[bug]:
            test, case = property_function(ref)
            with pytest.MonkeyPatch.context() as patched:
                plant(patched, bug)
                before = time.perf_counter() - start
                run = (run_random(test, case, seconds - before, seed, trace=False) if engine == "random"
                       else run_hypofuzz(test, case, seconds - before, seed))
            if run["found_at"] is not None:
                found = before + run["found_at"]
                break
        result[engine] = found
    return result


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="coverage budget per property and engine")
    parser.add_argument("--detect", type=float, default=60.0, help="detection budget per bug and engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--only", choices=("coverage", "detection"))
    parser.add_argument("--out", default=str(REPO / "docs" / "data"), help="folder of fuzz_vs_random.json")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    from tests.planted_bugs import BUGS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    report = {**stamp(), "seconds": args.seconds, "detect_seconds": args.detect, "seed": args.seed, "jobs": args.jobs}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker) as pool:
        if args.only != "detection":
            targets = property_targets()
            report["coverage"] = list(pool.map(coverage_job, targets, [args.seconds] * len(targets),
                                               [args.seed] * len(targets)))
        if args.only != "coverage":
            bugs = sorted(BUGS)
            report["detection"] = list(pool.map(detection_job, bugs, [args.detect] * len(bugs),
                                                [args.seed] * len(bugs)))
    if "coverage" in report:
        table = Table(title=f"coverage in {args.seconds:g} s per property (transitions in sim/; examples)")
        for column in ("property", "random", "hypofuzz"):
            table.add_column(column, justify="left" if column == "property" else "right")
        for row in report["coverage"]:
            table.add_row(row["target"], *(f"{row[e]['branches']} ({row[e]['examples']})" for e in ("random", "hypofuzz")))
        wins = {e: sum(row[e]["branches"] > row[o]["branches"] for row in report["coverage"])
                for e, o in (("random", "hypofuzz"), ("hypofuzz", "random"))}
        report["coverage_summary"] = {"targets": len(report["coverage"]), "more_for": wins,
                                      "total": {e: sum(r[e]["branches"] for r in report["coverage"])
                                                for e in ("random", "hypofuzz")}}
        console.print(table)
        console.print(report["coverage_summary"])
    if "detection" in report:
        table = Table(title=f"seconds to detection, planted bugs one at a time (budget {args.detect:g} s)")
        for column in ("bug", "random", "hypofuzz"):
            table.add_column(column, justify="left" if column == "bug" else "right")
        for row in report["detection"]:
            table.add_row(row["bug"], *("missed" if row[e] is None else f"{row[e]:.2f}" for e in ("random", "hypofuzz")))
        report["detection_summary"] = {e: {"found": sum(r[e] is not None for r in report["detection"]),
                                           "median_s": _median([r[e] for r in report["detection"]])}
                                       for e in ("random", "hypofuzz")}
        console.print(table)
        console.print(report["detection_summary"])
    (out / "fuzz_vs_random.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    console.print(f"written: {out / 'fuzz_vs_random.json'}")


if __name__ == "__main__":
    main()
