#!/usr/bin/env python
"""How small the suite's counterexamples shrink: for each planted bug whose catcher is a
property over tensors or payloads, plant it, let Hypothesis find and shrink a failing example,
and report what the shrunk example holds: each drawn tensor's shape and its non-zero
elements (a payload: its values, over every parameter; under 1-bit, the signs that are not +1). Writes docs/data/shrink_after.json
with the commit it measured.

    .venv/bin/python -m scripts.shrink_report [--bugs a,b] [--out docs/data/shrink_after.json]

It reads the final example through Hypothesis internals (ConjectureData.draw and
StateForActualGivenExecution.execute_once: the draws of the last example run, which is the
shrunk one replayed), and sets a catcher's settings as tests/test_planted_bugs.py does; no
public API exposes either. A measurement script, never part of the suite.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis.core import StateForActualGivenExecution
from hypothesis.internal.conjecture.data import ConjectureData

from scripts import CHECKOUT, in_checkout
from tests.planted_bugs import BUGS, CATCHERS, plant, property_function

TENSOR_PROPERTIES = ("test_align", "test_distro", "test_aggregate", "test_wire", "test_helper")
drawn: list = []


def _values(x):
    """Every tensor a drawn value holds: tensors, and payloads' values (params and helper slabs)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _values(item)
    elif hasattr(x, "params") and hasattr(x, "helper_params"):   # a Payload: 1-bit values off +1
        values = torch.cat([s.values.flatten() for s in [*x.params.values(), *x.helper_params.values()]])
        yield values - 1 if x.quantized else values


def _recording(draw):
    def wrapped(self, strategy, *args, **kwargs):
        top = self.depth == 0   # what the test receives, not the pieces it was built from
        value = draw(self, strategy, *args, **kwargs)
        if top:
            drawn.extend((tuple(t.shape), int(torch.count_nonzero(t))) for t in _values(value)
                         if t.dtype.is_floating_point)
        return value
    return wrapped


def _clearing(execute):
    def wrapped(self, *args, **kwargs):
        drawn.clear()
        return execute(self, *args, **kwargs)
    return wrapped


def shrunk(bug: str) -> dict | None:
    refs = [ref for ref in CATCHERS[bug] if ref.split("::")[0] in TENSOR_PROPERTIES]
    if not refs:
        return None
    test, case = property_function(refs[0])
    with pytest.MonkeyPatch().context() as patched:
        plant(patched, bug)
        own = test._hypothesis_internal_use_settings
        patched.setattr(test, "_hypothesis_internal_use_settings", settings(
            own, database=None, max_examples=max(own.max_examples, 200), report_multiple_bugs=False,
            phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck)))
        start = time.perf_counter()
        try:
            test(**case)
        except (AssertionError, pytest.fail.Exception):
            pass
        else:
            return {"catcher": refs[0], "caught": False}
    largest = max(drawn, key=lambda d: d[1], default=((), 0))
    return {"catcher": refs[0], "caught": True, "seconds": time.perf_counter() - start,
            "tensors": [{"shape": list(s), "nonzero": n} for s, n in drawn],
            "nonzero": sum(n for _, n in drawn), "largest": {"shape": list(largest[0]), "nonzero": largest[1]}}


def measure(bugs: list[str] | None) -> dict:
    """{"bugs": {bug: row}, "median_nonzero"} in the checkout on sys.path."""
    ConjectureData.draw = _recording(ConjectureData.draw)
    StateForActualGivenExecution.execute_once = _clearing(StateForActualGivenExecution.execute_once)
    report = {}
    for bug in bugs or sorted(BUGS):
        row = shrunk(bug)
        if row is None:
            continue
        report[bug] = row
        print(f"{bug:45s} {row.get('nonzero', '-')!s:>6} non-zero  {row.get('largest')}", file=sys.stderr, flush=True)
    counts = [r["nonzero"] for r in report.values() if r["caught"]]
    return {"bugs": report, "median_nonzero": statistics.median(counts) if counts else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bugs", help="comma-separated; default: every bug with a tensor catcher")
    parser.add_argument("--checkout", type=Path, default=CHECKOUT, help="the checkout to measure (default: this one)")
    parser.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "data" / "shrink_after.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bugs = args.bugs.split(",") if args.bugs else None
    if args.child:
        print(json.dumps(measure(bugs)))
        return 0
    from sim.provenance import stamp   # this checkout's, whichever one is measured
    checkout = args.checkout.resolve()
    report = json.loads(in_checkout(checkout, "scripts.shrink_report", ["--bugs", args.bugs] if args.bugs else []))
    print(f"median non-zero elements of a shrunk counterexample: {report['median_nonzero']} over "
          f"{sum(r['caught'] for r in report['bugs'].values())} bugs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**stamp(checkout), **report}, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
