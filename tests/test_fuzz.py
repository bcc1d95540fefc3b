"""Failures HypoFuzz finds are ordinary failures: HypoFuzz fuzzes in the suite's example
database, under the keys pytest replays (root conftest.py); `make fuzz` (scripts/fuzz.sh)
then replays the database under pytest, so each failure gets its record and its
`scripts/reproduce.sh` line, which replays it exactly. Shown on a planted bug."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.internal.reflection import function_digest

from properties.test_helper import test_helper_indices_are_sorted_unique_and_inside_the_full_width_suffix as fuzzed
from tests.test_reproduce import reproduce

REPO = Path(__file__).resolve().parent.parent
PROPERTY = "properties/test_helper.py::test_helper_indices_are_sorted_unique_and_inside_the_full_width_suffix"
BUG = "helper_indices_from_the_whole_width"
HANG_GUARD_S = 600   # HypoFuzz finds this bug in its first few examples


def database_key() -> bytes:
    """The key HypoFuzz saves the property's shrunk failures under (and pytest replays)."""
    inner = fuzzed.hypothesis.inner_test
    saved = getattr(inner, "_hypothesis_internal_add_digest", None)
    inner._hypothesis_internal_add_digest = PROPERTY.encode()
    try:
        return function_digest(inner)
    finally:
        inner._hypothesis_internal_add_digest = saved


def stop(process: subprocess.Popen) -> None:
    """HypoFuzz and its workers (their own process group) killed outright: what they saved is
    already whole (the database writes each example to a temporary file, then renames it)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:   # already gone
        pass
    process.wait(timeout=HANG_GUARD_S)


def run(argv, env):
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_a_failure_hypofuzz_finds_gets_a_record_that_reproduce_replays(tmp_path, monkeypatch):
    env = {**os.environ, "MATSIM_PLANT": BUG, "MATSIM_EXAMPLES_DB": str(tmp_path / "db"),
           "MATSIM_FAILURES": str(tmp_path / "failures"), "MATSIM_FUZZ_OUT": str(tmp_path / "fuzz")}
    env.pop("PYTEST_XDIST_WORKER", None)
    # HypoFuzz until its shrunk failure is in the database (polled: no assumption on speed).
    log = (tmp_path / "hypofuzz.log").open("w")
    fuzzer = subprocess.Popen([str(Path(sys.executable).parent / "hypothesis"), "fuzz", "-n", "1", "--no-dashboard",
                               "--", PROPERTY], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    database, key, start = DirectoryBasedExampleDatabase(str(tmp_path / "db")), database_key(), time.monotonic()
    try:
        while not list(database.fetch(key)) and time.monotonic() - start < HANG_GUARD_S:
            try:   # between looks at the database: returns at once if HypoFuzz ends
                fuzzer.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
    finally:
        stop(fuzzer)
    assert list(database.fetch(key)), (tmp_path / "hypofuzz.log").read_text()[-3000:]

    replayed = run(["sh", "scripts/fuzz.sh", "0", PROPERTY], env)   # make fuzz's replay and report
    assert replayed.returncode == 1, replayed.stdout[-3000:] + replayed.stderr[-2000:]
    (report,) = json.loads((tmp_path / "fuzz" / "report.json").read_text())["properties"]
    assert report["test"] == PROPERTY and report["failures"] == 1 and report["examples"] > 0, report
    (record_path,) = (tmp_path / "failures").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["test"] == PROPERTY and record["planted_bug"] == BUG and record["blob"].startswith("b'")

    replay = reproduce(record_path, monkeypatch)
    assert replay.returncode == 1 and "reproduced:" in replay.stdout, replay.stdout[-2000:] + replay.stderr


def test_every_profile_draws_new_inputs_each_run_even_where_ci_is_set():
    """Hypothesis loads its own derandomized "ci" profile when $CI is set; the suite's profiles
    must not inherit it (a push would replay one fixed set of inputs, and HypoFuzz refuses
    derandomized tests)."""
    code = ("from properties.profiles import PROFILES, register_profiles; register_profiles(); "
            "from hypothesis import settings; "
            "print(sorted({settings.get_profile(name).derandomize for name in PROFILES}))")
    for ci in ("true", ""):
        shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "CI": ci},
                               capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert shown.stdout.strip() == "[False]", shown.stdout + shown.stderr


def test_the_sweep_report_names_a_test_inside_a_class_by_its_pytest_node_id(tmp_path):
    """A state machine's runTest sits in a class: junit's classname is the module path then the
    class, and the sweep's outcome must still reach the property's row (it read "not run")."""
    from scripts.fuzz_report import sweep_outcomes
    junit = tmp_path / "sweep.xml"
    junit.write_text('<testsuites><testsuite>'
                     '<testcase classname="properties.test_runs.test_whole_run_state_machine" name="runTest" />'
                     '<testcase classname="properties.test_runs" name="test_x"><failure /></testcase>'
                     '</testsuite></testsuites>')
    assert sweep_outcomes(junit) == {"properties/test_runs.py::test_whole_run_state_machine::runTest": "passed",
                                     "properties/test_runs.py::test_x": "failed"}
