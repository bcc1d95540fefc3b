"""`matsim fuzz --impl`: differential fuzzing of an implementation through the vectors'
protocol (sim/fuzz.py)."""
import json
import sys
from pathlib import Path

import pytest

from sim import fuzz, vectors
from tests.cli import matsim_here

REFERENCE = f"{sys.executable} -m sim.conformance"
HANG_GUARD_S = 120.0   # starting an interpreter that imports torch, on a loaded machine


def planted(bug: str) -> str:
    return f"{sys.executable} -m tests.planted_adapter {bug}"


def test_matsims_own_adapter_fuzzes_clean_and_every_op_gets_cases(tmp_path):
    ops = ["prefix_dim", "chunk_size", "compress", "align_prefix_grad"]
    reports = fuzz.fuzz(REFERENCE, ops, 2.0, "matsim", 0, tmp_path / "out", tmp_path / "db", echo=lambda _: None,
                        timeout_s=HANG_GUARD_S)
    assert [r.op for r in reports] == ops
    assert all(r.tried > 0 and r.passed + r.unsupported == r.tried and not r.mismatches and not r.errors
               for r in reports), [r.__dict__ for r in reports]


def test_a_mismatch_is_shrunk_written_as_a_found_vector_replayed_by_check_and_tried_first_next_time(tmp_path):
    """The planted bug answers otherwise: the shrunk case is a one-case vectors directory flagged
    found, which `vectors check` fails with the bug and passes without it; the next run's first
    case is that one (Hypothesis's example database)."""
    lines = []
    reports = fuzz.fuzz(planted("topk_keeps_the_smallest"), ["compress"], 30.0, "matsim", 0, tmp_path / "out",
                        tmp_path / "db", echo=lines.append, timeout_s=HANG_GUARD_S)
    (report,) = reports
    assert report.mismatches == 1 and len(report.found) == 1
    found = Path(report.found[0]["directory"])
    (case,) = vectors.load(found)
    assert "found" in case["flags"] and case["op"] == "compress"
    assert any(line.startswith("FOUND compress") for line in lines) and any("replay: matsim vectors check" in line
                                                                             for line in lines)
    assert vectors.check(found, planted("topk_keeps_the_smallest"), timeout_s=HANG_GUARD_S)[0].status == "fail"
    assert vectors.check(found, REFERENCE, timeout_s=HANG_GUARD_S)[0].status == "pass"
    (again,) = fuzz.fuzz(planted("topk_keeps_the_smallest"), ["compress"], 30.0, "matsim", 1, tmp_path / "again",
                         tmp_path / "db", echo=lambda _: None, timeout_s=HANG_GUARD_S)
    assert again.mismatches == 1 and again.tried_to_first_mismatch == 1


def _fake(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake.py"
    script.write_text("import json, sys\n"
                      "print(json.dumps({'hello': {'ops': ['chunk_size']}}), flush=True)\n"
                      "seen = 0\n"
                      "for line in sys.stdin:\n"
                      "    request = json.loads(line)\n"
                      "    if 'hello' in request:\n"
                      "        continue\n"
                      "    seen += 1\n"
                      "    if seen < 3:\n"
                      "        n, c = request['inputs']['n'], request['inputs']['chunk']\n"
                      "        size = max(d for d in range(1, min(n, c) + 1) if n % d == 0)\n"
                      "        print(json.dumps({'id': request['id'], 'outputs': {'size': size}}), flush=True)\n"
                      "        continue\n" + body)
    return f"{sys.executable} {script}"


@pytest.mark.parametrize("body, reason", [
    ("    sys.exit(3)\n", "the implementation exited"),
    ("    print('not json', flush=True)\n", "the answer is not JSON"),
    ("    import time; time.sleep(3600)\n", "no answer within"),
])
def test_an_implementation_that_breaks_is_named_in_one_line_its_case_kept_and_the_run_exits_1(tmp_path, body, reason):
    """Two right answers, then a crash, garbage or a hang (the timeout is a hang guard: the
    fake never answers): the run names the case, keeps it as found, and exits 1."""
    result = matsim_here("fuzz", "--impl", _fake(tmp_path, body), "--ops", "chunk_size", "--seconds", "60",
                         "--timeout", "5", "--out", str(tmp_path / "out"), "--db", str(tmp_path / "db"))
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())["ops"][0]
    assert report["errors"] == 1 and report["passed"] == 2 and reason in report["found"][0]["reason"]
    assert "chunk_size-fuzz-" in report["found"][0]["reason"]
    assert [c["op"] for c in vectors.load(report["found"][0]["directory"])] == ["chunk_size"]


@pytest.mark.parametrize("argv, fragment", [
    (["--impl", "no-such-command-anywhere"], "cannot be started"),
    (["--impl", REFERENCE, "--ops", "nonsense"], "--ops names unknown ops ['nonsense']"),
    (["--impl", REFERENCE, "--reading", "rust"], "--reading 'rust' is unknown"),
    (["--impl", REFERENCE, "--seconds", "0"], "--seconds 0 is invalid"),
])
def test_a_command_or_flag_fuzz_cannot_use_is_one_line_and_exit_2(tmp_path, argv, fragment):
    result = matsim_here("fuzz", *argv, "--out", str(tmp_path / "out"), "--db", str(tmp_path / "db"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
