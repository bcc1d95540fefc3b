"""Whole runs: determinism, shared weights vs replicas, the testnet CLI and analysis."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sim.config import load_config
from sim.run import simulate
from tests.cli import matsim, matsim_here

TINY = load_config("tiny")


def test_same_seed_same_config_gives_byte_identical_metrics_on_cpu(tmp_path):
    for name in ("a", "b"):
        simulate(TINY, [0, 1, 2], [0, 0.5, 0.25], faults="drop=0.1,corrupt=0.1,churn=0.1", seed=7, rounds=5,
                 out=tmp_path / name, device="cpu")
    a, b = (tmp_path / n / "metrics.jsonl" for n in ("a", "b"))
    assert a.read_bytes() == b.read_bytes() and len(a.read_text().splitlines()) == 5
    other = simulate(TINY, [0, 1, 2], faults="drop=0.1,corrupt=0.1,churn=0.1", seed=8, rounds=5, device="cpu")
    assert other.records != [json.loads(line) for line in a.read_text().splitlines()]


def test_batching_auto_is_bit_identical_to_on_wherever_it_batches_every_group(tmp_path):
    """The docs' table of bit-identical settings: on tiny (under auto's bound) with two peers
    of each shape, auto batches every group as on does, so the two are one computation. The
    twin with batching off takes the other gradient route; it is only equal to round-off."""
    runs = {b: simulate(TINY, [0, 0, 1, 1], faults="drop=0.1,late=0.1", seed=3, rounds=4, out=tmp_path / b,
                        device="cpu", batching=b) for b in ("auto", "on")}
    assert (tmp_path / "auto" / "metrics.jsonl").read_bytes() == (tmp_path / "on" / "metrics.jsonl").read_bytes()
    assert all(torch.equal(runs["on"].final_weights[n], t) for n, t in runs["auto"].final_weights.items())


@pytest.mark.parametrize("tiers", [(0, 1, 1), (0, 2, 1, 0)])
def test_shared_weights_mode_equals_replica_mode_exactly(tiers):
    replicas = simulate(TINY, list(tiers), seed=1, rounds=4, device="cpu")
    shared = simulate(TINY, list(tiers), seed=1, rounds=4, shared_weights=True, device="cpu")
    assert [r["eval_loss"] for r in replicas.records] == [r["eval_loss"] for r in shared.records]
    assert all(torch.equal(shared.final_weights[n], t) for n, t in replicas.final_weights.items())


def test_held_out_loss_is_measured_on_round_0_every_eval_every_rounds_and_the_last():
    every = simulate(TINY, [0, 1], seed=2, rounds=4, eval_every=1, device="cpu")
    sparse = simulate(TINY, [0, 1], seed=2, rounds=4, eval_every=3, device="cpu")
    assert every.eval_rounds == [0, 1, 2, 3] and sparse.eval_rounds == [0, 3]
    # Evaluating is a pure measurement: it changes no weight and no other number.
    assert sparse.eval_losses == [every.eval_losses[0], every.eval_losses[3]]
    assert all(torch.equal(sparse.final_weights[n], t) for n, t in every.final_weights.items())
    assert simulate(TINY, [0], seed=2, rounds=120, device="cpu").eval_rounds == [*range(0, 120, 3), 119]


@pytest.mark.parametrize("argv, fragment", [
    (["--num-clients", "2"], "names 3 clients but --num-clients is 2"),
    (["--client-matformer-helper-fractions", "0,1.5,0"], "helper fraction 1.5 is outside [0, 1]"),
    (["--client-matformer-helper-fractions", "0,0"], "got 2 helper fractions for 3 peers"),
    (["--faults", "meteor=0.1"], "fault kind 'meteor' is unknown"),
    (["--config-path", "configs/missing"], "does not exist"),
    (["--eval-every", "0"], "--eval-every 0 is invalid"),
    (["--matformer-helper-rotation-interval", "0"], "--matformer-helper-rotation-interval 0 is invalid"),
    (["--client-matformer-helper-fractions", "0,-0.25,0"], "helper fraction -0.25 is outside [0, 1]"),
    (["--client-matformer-tiers", "0,1:x,1"], "is not a comma-separated list of tiers"),
    (["--peer-batching", "sometimes"], "--peer-batching: invalid choice: 'sometimes'"),
    (["--peer-batching", "on", "--backend", "distributed"], "--peer-batching on needs --backend inprocess"),
])
def test_testnet_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, argv, fragment):
    result = matsim_here("testnet", "start", "--client-matformer-tiers", "0,1,1", "--out", str(tmp_path / "out"), *argv)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_headless_exit_after_secs_ends_at_a_round_boundary_with_the_summary_written(tmp_path):
    result = matsim("testnet", "start", "--headless", "--headless-exit-after-secs", "0.001", "--num-clients", "3",
                    "--config-path", "tiny", "--client-matformer-tiers", "0,1,1", "--rounds", "50",
                    "--tui", "false", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert summary["stopped_early"] and summary["rounds"] == len(lines) < 50
    assert json.loads(lines[-1])["eval_loss"] == summary["final_eval_loss"]  # the stop is evaluated
    assert "loss=" in (tmp_path / "run.log").read_text()


def test_log_level_debug_prints_each_gradients_local_and_full_shape(tmp_path):
    result = matsim("testnet", "start", "--config-path", "tiny", "--client-matformer-tiers", "0,1", "--rounds", "1",
                    "--log-level", "debug", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "parameter=model.layers.0.mlp.gate_proj.weight local_shape=[32, 32] full_shape=[64, 32]" in result.stderr
    assert "parameter=model.layers.0.mlp.down_proj.weight local_shape=[32, 32] full_shape=[32, 64]" in result.stderr


def test_analyze_passes_a_good_matrix_and_fails_a_heterogeneous_run_15_percent_off(tmp_path):
    from sim.scenario import RunFlags, run_scenario
    run_scenario(RunFlags("tiny"), "0,0", None, tmp_path / "homogeneous", name="homogeneous", kind="baseline", oracle=None,
                 seed=0, rounds=3, faults=None, echo=False)
    run_scenario(RunFlags("tiny"), "0,1", None, tmp_path / "hetero", name="hetero", kind="heterogeneous", oracle="homogeneous",
                 seed=0, rounds=3, faults=None, echo=False)
    good = matsim_here("analyze", str(tmp_path))
    assert good.returncode == 0 and "verdict: PASS (2/2" in good.stdout, good.stdout
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    metrics = tmp_path / "hetero" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1]["eval_loss"] *= 1.2  # what a normalization bug looks like in the final loss
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    bad = matsim_here("analyze", str(tmp_path))
    assert bad.returncode == 1 and "verdict: FAIL (1/2" in bad.stdout
    rows = {row["scenario"]: row for row in json.loads((tmp_path / "analysis.json").read_text())["rows"]}
    assert rows["hetero"]["criteria"]["final loss within 15% of homogeneous"] is False
    assert rows["homogeneous"]["passed"]


def test_replica_max_diff_is_the_largest_difference_on_shared_elements():
    from sim.model import MatFormerLM, build_model, load_prefix
    from sim.run import _replica_max_diff
    full, copy = build_model(TINY.model, 0, seed=1, device="cpu"), build_model(TINY.model, 0, seed=1, device="cpu")
    sliced = load_prefix(MatFormerLM(TINY.model, stored_widths=[32, 32]), full.state_dict())
    full, copy, sliced = (dict(model.named_parameters()) for model in (full, copy, sliced))
    assert _replica_max_diff([full, copy, sliced]) == 0.0
    with torch.no_grad():
        copy["model.layers.0.mlp.down_proj.weight"][3, 60] += 0.5   # a suffix element: the sliced replica lacks it
        sliced["lm_head.weight"][2, 5] -= 0.25
    assert _replica_max_diff([full, copy, sliced]) == pytest.approx(0.5)
    assert _replica_max_diff([full, sliced]) == pytest.approx(0.25)


@pytest.mark.parametrize("argv, fragment", [
    (["--only", "homogeneous,sideways"], "--only names unknown scenarios ['sideways']"),
    (["--jobs", "0"], "--jobs 0 is invalid"),
    (["--peer-batching", "sometimes"], "--peer-batching: invalid choice: 'sometimes'"),
])
def test_matrix_bad_input_is_one_line_exit_2_and_runs_nothing(tmp_path, argv, fragment):
    result = matsim_here("matrix", "--config-path", "tiny", "--out", str(tmp_path / "out"), *argv)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_killed_matrix_takes_its_scenario_processes_with_it(tmp_path):
    """SIGKILL leaves a process pool no chance to stop its workers: they must notice."""
    matrix = subprocess.Popen([sys.executable, "-m", "sim", "matrix", "--config-path", "tiny",
                               "--only", "homogeneous", "--jobs", "2", "--rounds", "100000",
                               "--out", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "homogeneous" / "metrics.jsonl"   # written by the scenario running in a pool worker
        assert poll(metrics.exists), "the scenario never started"
        workers = children(matrix.pid)
    finally:
        matrix.kill()
        matrix.wait()
    assert workers and poll(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers)), "workers outlived it"


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def poll(done, within_s: float = 120.0) -> bool:
    """A hang guard, not a timing: generous enough for a machine 5x slower."""
    until = time.monotonic() + within_s
    while not done():
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
    return True


def test_analyze_warns_when_the_no_suffix_baseline_ends_where_the_oracle_does(tmp_path):
    """A matrix whose baseline matches its oracle has no power over FFN-side bugs: say so."""
    from sim.scenario import RunFlags, run_scenario
    run_scenario(RunFlags("tiny"), "0,0", None, tmp_path / "homogeneous", name="homogeneous", kind="baseline", oracle=None,
                 seed=0, rounds=2, faults=None, echo=False)
    shutil.copytree(tmp_path / "homogeneous", tmp_path / "no_suffix")
    meta = json.loads((tmp_path / "no_suffix" / "scenario.json").read_text())
    (tmp_path / "no_suffix" / "scenario.json").write_text(json.dumps({**meta, "name": "no_suffix", "tiers": "2,2",
                                                                       "kind": "no-suffix", "oracle": "homogeneous"}))
    assert "warning: the no-suffix baseline ends +0.0% from the oracle" in matsim_here("analyze", str(tmp_path)).stdout
    metrics = tmp_path / "no_suffix" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1]["eval_loss"] *= 1.05
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "warning" not in matsim_here("analyze", str(tmp_path)).stdout
