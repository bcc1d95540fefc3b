"""One-command reproduction, shown on a planted bug: a failing property leaves a record
under results/failures/ and prints `scripts/reproduce.sh RECORD`, which replays the shrunk
example exactly (failing while the bug is in, passing once it is out)."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from properties.reproduce import main as replay

REPO = Path(__file__).resolve().parent.parent
PROPERTY = "properties/test_zero_tail.py::test_tier_grads_are_zero_outside_the_prefix_and_equal_an_independent_tier_model"


def run(argv, env, timeout=600):
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_failing_property_leaves_a_record_that_reproduce_replays(tmp_path, monkeypatch):
    env = {**os.environ, "MATSIM_PLANT": "gradient_leaks_into_the_suffix", "MATSIM_FAILURES": str(tmp_path),
           "MATSIM_EXAMPLES_DB": str(tmp_path / "db"), "HYPOTHESIS_PROFILE": "ci"}
    env.pop("PYTEST_XDIST_WORKER", None)
    found = run(["-m", "pytest", PROPERTY, "-p", "no:xdist", "-p", "no:cacheprovider", "-q"], env)
    assert found.returncode == 1, found.stdout[-2000:]
    (record_path,) = tmp_path.glob("*.json")
    assert f"scripts/reproduce.sh {record_path}" in found.stdout
    record = json.loads(record_path.read_text())
    assert record["test"] == PROPERTY and record["blob"].startswith("b'") and record["planted_bug"]
    assert {"tiers", "seed", "model"} <= set(record["described"])
    assert record["example"].startswith(("Failing test case", "Falsifying example")) and record["versions"]["torch"]

    replay = reproduce(record_path, monkeypatch)
    assert replay.returncode == 1 and "reproduced:" in replay.stdout, replay.stdout[-2000:] + replay.stderr
    record["planted_bug"] = None  # the bug fixed: the same example passes
    record_path.write_text(json.dumps(record))
    fixed = reproduce(record_path, monkeypatch)
    assert fixed.returncode == 0 and "did not reproduce" in fixed.stdout, fixed.stdout[-2000:] + fixed.stderr


def reproduce(record_path: Path, monkeypatch) -> subprocess.CompletedProcess:
    """properties/reproduce.py in this process (it starts its own pytest for the replay),
    as a developer's shell would run it: no planted bug, no xdist worker."""
    for name in ("MATSIM_PLANT", "PYTEST_XDIST_WORKER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MATSIM_EXAMPLES_DB", str(record_path.parent / "db"))  # never the repo's database
    return replay_here(str(record_path))


def replay_here(*argv) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = replay(list(argv))
    return subprocess.CompletedProcess(["reproduce", *argv], code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"), ("{not json", "is not valid JSON"), ('{"test": "x"}', "lacks blob, hypothesis_version"),
])
def test_a_bad_record_is_one_line_and_exit_2(tmp_path, content, fragment):
    path = tmp_path / "record.json"
    if content is not None:
        path.write_text(content)
    result = replay_here(str(path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
