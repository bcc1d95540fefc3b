"""Failure records: every failing property leaves a JSON file that replays it.

When a Hypothesis test fails, the root conftest.py calls `write_record`, which
saves under results/failures/ (or $MATSIM_FAILURES): the test id, Hypothesis's
reproduction blob of the shrunk example, the example as printed, what the test
chose to `describe` about it (tier assignment, fault plan, seed), the profile,
a planted bug if one was switched on, and the versions that produced it. The
failure report then ends with the one-line command that replays it:

    scripts/reproduce.sh results/failures/<test>.json

properties/reproduce.py runs that one test with $MATSIM_REPRODUCE pointing at the
record; `apply_reproduction` (called at collection) attaches the blob to the
test, so Hypothesis replays exactly that example, on CPU, without the database.
State machines replay the same way (the blob goes on the machine class). A
record without a blob (Hypothesis printed none) replays from the example database.
"""
import ast
import json
import os
import platform
import re
import subprocess
import textwrap
from pathlib import Path

import hypothesis

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOB = re.compile(r"@reproduce_failure\('([^']+)', (b'[^']*')\)")
_described: dict = {}


def describe(**fields) -> None:
    """Name what a failing example means for a reader (tiers, faults, seed): the last call
    before a failure goes into its record. Values must be JSON-serializable."""
    _described.clear()
    _described.update(fields)


def failures_dir() -> Path:
    return Path(os.environ.get("MATSIM_FAILURES", REPO_ROOT / "results" / "failures"))


def _versions() -> dict:
    import numpy
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "hypothesis": hypothesis.__version__, "matsim_commit": commit}


def _example(longrepr: str) -> str | None:
    """The shrunk example as Hypothesis printed it ("Failing test case: ..." or, for state
    machines and older versions, "Falsifying example: ..."), without pytest's "E" gutter."""
    start = max(longrepr.rfind("Failing test case"), longrepr.rfind("Falsifying example"))
    if start < 0:
        return None
    lines = []
    for line in longrepr[start:].splitlines():
        line = re.sub(r"^E ?", "", line)
        if "reproduce this test case" in line or line.startswith(("Explanation:", "Traceback")):
            break
        lines.append(line)
    return (lines[0].strip() + "\n" + textwrap.dedent("\n".join(lines[1:]))).strip()


def write_record(nodeid: str, longrepr: str, profile: str) -> Path:
    """Save the record of a failed Hypothesis test and return its path (written atomically)."""
    blob = BLOB.search(longrepr)
    record = {
        "test": nodeid,
        "blob": blob.group(2) if blob else None,
        "hypothesis_version": blob.group(1) if blob else hypothesis.__version__,
        "example": _example(longrepr),
        "described": dict(_described),
        "profile": profile,
        "planted_bug": os.environ.get("MATSIM_PLANT"),
        "versions": _versions(),
    }
    directory = failures_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_") + ".json")
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)
    return path


def apply_reproduction(items) -> None:
    """With $MATSIM_REPRODUCE set, attach the record's blob to its test."""
    record_path = os.environ.get("MATSIM_REPRODUCE")
    if not record_path:
        return
    record = json.loads(Path(record_path).read_text())
    for item in items:
        if item.nodeid == record["test"] and record["blob"]:
            blob = ast.literal_eval(record["blob"])  # a bytes literal, as Hypothesis prints it
            # A state machine's TestCase reads the blob from the machine class; @given tests from
            # themselves. (Hypothesis's own attribute is the one route from a collected TestCase to
            # its machine: no public one exists.)
            target = getattr(item.obj, "_hypothesis_state_machine_class", item.obj)
            hypothesis.reproduce_failure(record["hypothesis_version"], blob)(target)
