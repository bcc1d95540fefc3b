"""An outside implementation runs the vectors: vectors/demo_impl/adapter.py wraps DeMo's
reference optimizer (bloc97/DeMo's demo.py, given as $MATSIM_DEMO; skipped, saying so,
without it). Held to Psyche's reading (whose DisTrO is DeMo's), every case DeMo can express
passes; held to matsim's, the only failures are the cases where matsim's reading knowingly
differs (flagged psyche_divergent, the answer Psyche's reading)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim.vectors import export
from tests.cli import matsim_here

ADAPTER = Path(__file__).resolve().parent.parent / "vectors" / "demo_impl" / "adapter.py"
EXPRESSIBLE = ("apply_update", "batch_decompress", "chunk_size", "compress", "dct_decode", "dct_encode",
               "error_feedback")


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    if not os.environ.get("MATSIM_DEMO"):
        pytest.skip("needs DeMo's demo.py (bloc97/DeMo): set MATSIM_DEMO to it or to a checkout holding it")
    if subprocess.run([sys.executable, "-c", "import einops"]).returncode:
        pytest.skip("DeMo's demo.py imports einops, which this environment lacks")
    directory = tmp_path_factory.mktemp("demo") / "vectors"
    export(directory, cases_per_op=8)
    reports = {}
    for reading in ("psyche", "matsim"):
        report = directory.parent / f"{reading}.json"
        result = matsim_here("vectors", "check", str(directory), "--impl", f"{sys.executable} {ADAPTER}",
                             "--reading", reading, "--report", str(report))
        reports[reading] = (result, json.loads(report.read_text())["results"])
    return reports


def test_demo_passes_every_case_it_can_express_under_psyches_reading(checked):
    result, rows = checked["psyche"]
    assert result.returncode == 0, result.stdout[-3000:]
    passed = {row["op"] for row in rows if row["status"] == "pass"}
    assert set(EXPRESSIBLE) <= passed, set(EXPRESSIBLE) - passed


def test_under_matsims_reading_demo_fails_only_where_the_readings_differ(checked):
    _, rows = checked["matsim"]
    failed = [row for row in rows if row["status"] not in ("pass", "unsupported", "skipped")]
    assert all("psyche_divergent" in row["flags"] and row["other_reading"] for row in failed), failed
