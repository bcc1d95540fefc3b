"""The multi-process backend (sim/distributed.py): exact parity with the in-process
simulator, and the faults only a process boundary shows. Every test runs under a hard
timeout and checks that no peer process outlives it, and that the run leaves nothing in the
temp folder (a killed process cannot clean up after itself)."""
import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from sim.clock import ManualClock, SimulatedClock
from sim.config import load_config
from sim.checkpoint import read_checkpoint
from sim.distributed import simulate_distributed
from sim.errors import SimError
from sim.faults import Fault, FaultPlan, NetworkFaults
from sim.run import simulate

TINY = load_config("tiny")
# Time in these tests is a hang guard or a margin, never the behaviour under test: a round of
# tiny takes milliseconds, so the others' payloads have 100s of times that after the first one.
ROUND_DEADLINE_S = 4.0
HANG_GUARD_S = 60.0


# Folders the temp folder may keep that are not matsim's: torch's compile cache, torchrun's and
# multiprocessing's own (removed when their process exits, which may be after the test).
NOT_OURS = ("torchinductor_", "torchelastic_", "pymp-")


@pytest.fixture(autouse=True)
def hard_timeout_and_no_leftovers(tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))          # the peer processes' temp folder too
    monkeypatch.setattr(tempfile, "tempdir", None)   # this process reads TMPDIR again

    def expire(signum, frame):
        raise TimeoutError("distributed test exceeded its 240 s timeout")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(240)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert multiprocessing.active_children() == [], "a peer process outlived its test"
    left = [p.name for p in temp.iterdir() if not p.name.startswith(NOT_OURS)]
    assert left == [], f"the run left {left} in the temp folder"


# Psyche's network faults (sim/faults.py NetworkFaults), applied in each peer process's send path:
# some payloads lost, some past a deadline of 1 s (max_round_train_time 0.5 + round_witness_time 0.5).
NETWORK = NetworkFaults(base_ms=600, jitter_ms=500, packet_loss=0.2, bandwidth=None, seed=11)


@pytest.mark.parametrize("config, modes, tiers, helpers, faults, network", [
    ("tiny", {"mean_semantics": "peer", "apply_rule": "adamw"}, [0, 1], None, None, None),   # Psyche's mean, AdamW
    ("tiny", {}, [0, 1, 2, (1, 0)], [0, 0.5, 0.25, 0], "drop=0.1,late=0.1,duplicate=0.1,corrupt=0.1,byzantine=0.1,churn=0.25",
     None),
    ("test-nanogpt-small", {}, [0, 1, 1], None, "nan=0.2,corrupt=0.1", None),
    ("tiny", {"max_round_train_time": 0.5, "round_witness_time": 0.5}, [0, 1, 1, 2], None, "churn=0.2", NETWORK),
])
def test_distributed_metrics_and_checkpoint_equal_the_in_process_simulators_exactly(tmp_path, config, modes, tiers,
                                                                                  helpers, faults, network):
    run = load_config(config).replace(**modes)
    rounds = 6 if config == "tiny" else 3
    local = simulate(run, tiers, helpers, faults, seed=5, rounds=rounds, device="cpu", batching="off",
                     out=tmp_path / "here", network_faults=network)
    # The coordinator's wait for payloads is a hang guard: the network's deadline is on the simulated clock.
    remote = simulate_distributed(run, tiers, helpers, faults, seed=5, rounds=rounds, out=tmp_path / "there",
                                  network_faults=network, round_deadline_s=HANG_GUARD_S if network else None)
    if network:
        fates = {link["fate"] for r in local.records for link in r["network"].values()}
        assert fates == {"on_time", "late", "lost"}, fates
    assert remote.records == local.records
    # The round's reporter hands its weights to the coordinator, which writes the same checkpoint.
    (_, hf_here, here), (_, hf_there, there) = (read_checkpoint(tmp_path / d / "checkpoint") for d in ("here", "there"))
    assert hf_here == hf_there and here.keys() == there.keys() and all(torch.equal(here[n], there[n]) for n in here)


def test_a_peer_killed_mid_round_is_left_out_and_the_others_complete_every_round():
    # The dead process is seen dead, not waited out: the deadline is a hang guard only.
    result = simulate_distributed(TINY, [0, 1, 1], seed=2, rounds=5, round_deadline_s=HANG_GUARD_S,
                                  trouble={2: {"crash": 2}})
    assert len(result.records) == 5
    assert [r.get("missing", []) for r in result.records] == [[], [], [2], [], []]
    assert [r["contributing_peers"] for r in result.records] == [3, 3, 2, 2, 2]
    assert all(r["replica_max_diff"] == 0.0 and r["receivers_agree"] for r in result.records)


def test_a_slow_peer_past_the_deadline_misses_the_round_and_its_payload_arrives_stale():
    slow = 0   # the lowest peer, which reports rounds: the reporter must move for that round
    # The slow peer sends round 1 only after the coordinator closed it: late by construction,
    # whatever the machine's speed. The others have ROUND_DEADLINE_S from the first payload.
    result = simulate_distributed(TINY, [0, 1, 1], seed=2, rounds=4, round_deadline_s=ROUND_DEADLINE_S,
                                  trouble={slow: {"slow": [1]}})
    assert [r.get("missing", []) for r in result.records] == [[], [slow], [], []]
    # A missed payload arrives with the next round, stale: counted, never applied.
    assert result.rejected() == {"stale_round": 1}
    for r in result.records:
        assert r["contributing_peers"] == 3 - len(r.get("missing", [])) and r["replica_max_diff"] == 0.0


def test_a_deadline_ends_the_run_at_a_round_boundary_with_that_round_evaluated():
    """The run's clock moves 4 s as each round's record arrives, whatever the machine's speed:
    the check after round 1 sees 4 s, the one after round 2 sees 8 s, past the 6 s deadline,
    so round 2 is the last, and evaluated although eval_every (10) would not evaluate it."""
    clock = ManualClock()
    result = simulate_distributed(TINY, [0, 1], seed=2, rounds=50, eval_every=10, deadline_s=6.0, clock=clock,
                                  on_round=lambda record: clock.advance(4.0))
    assert result.stopped_early and len(result.records) == 3
    assert result.records[-1]["eval_loss"] is not None and result.records[1]["eval_loss"] is None


def test_a_peer_that_never_joins_is_a_clear_error_not_a_hang():
    """On a simulated clock the 20 s pass while the coordinator waits, in no real time: peer 0
    may not have joined by then either, peer 1 never does."""
    clock = SimulatedClock()
    with pytest.raises(SimError, match=r"^peers? (0, )?1 did not join within 20 s"):
        simulate_distributed(TINY, [0, 1], seed=2, rounds=3, join_timeout_s=20, trouble={1: {"never_join": True}},
                             clock=clock)
    assert 20 < clock.now() < 20.1


def test_a_torchrun_launch_gives_the_same_metrics_as_the_in_process_simulator(tmp_path):
    """torchrun starts the coordinator (rank 0) and one process per client; rank 0 writes."""
    flags = ["--num-clients", "2", "--config-path", "tiny", "--client-matformer-tiers", "0,1", "--rounds", "3",
             "--faults", "drop=0.2,corrupt=0.2", "--seed", "4"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "PYTEST_XDIST_WORKER")}
    # Its own process group, so a timeout takes torchrun's workers down with it.
    launched = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                                 "-m", "sim", "testnet", "start", "--backend", "distributed", *flags,
                                 "--out", str(tmp_path / "torchrun")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)
    try:
        _, stderr = launched.communicate(timeout=200)
        assert not group_alive(launched.pid), "a torchrun worker outlived the launch"
    finally:
        if group_alive(launched.pid):
            os.killpg(launched.pid, signal.SIGKILL)
    assert launched.returncode == 0, stderr[-3000:]
    local = simulate(TINY, [0, 1], faults="drop=0.2,corrupt=0.2", seed=4, rounds=3, device="cpu", batching="off")
    lines = (tmp_path / "torchrun" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == local.records


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_churn_kills_a_leaving_peers_process_and_a_new_one_rejoins_with_the_same_records(monkeypatch):
    """Churn as real clients churn: each peer that leaves has its process killed, and a new
    process comes back for it, catches up on the run's membership and rejoins; the records
    equal the in-process run's (AdamW's moments included: the new process takes its donor's).
    With tied embeddings, as ffn-small and the nanogpt configs have them: the donor's weights
    then hold one tensor under two names (untied weights take the same path)."""
    import sim.distributed as backend
    started = []
    spawn = multiprocessing.get_context("spawn")

    class Counting:
        def Process(self, *args, **kwargs):
            process = spawn.Process(*args, **kwargs)
            started.append(kwargs["args"][0])
            return process
    monkeypatch.setattr(backend.multiprocessing, "get_context", lambda method: Counting())
    run = TINY.replace(apply_rule="adamw", model=dataclasses.replace(TINY.model, tie_word_embeddings=True))
    local = simulate(run, [0, 1, 1, 2], faults="churn=0.3", seed=3, rounds=6, device="cpu", batching="off")
    remote = simulate_distributed(run, [0, 1, 1, 2], faults="churn=0.3", seed=3, rounds=6)
    returns = sum(r["faults"].get("churn", 0) for r in local.records)
    assert returns > 0 and len(started) > 4, started          # new processes beyond the first four
    assert remote.records == local.records


def test_a_peer_back_from_a_sliced_checkpoint_never_reports_the_round():
    """The round's reporter evaluates the full model and hands over checkpoints, so it must
    hold the full weights: peer 0 at tier 1 leaves and comes back from a sliced checkpoint (it
    then holds its prefix alone), and is the lowest peer whose payload arrives."""
    plan = FaultPlan((Fault(1, 0, "churn", away=1, rejoin_from="sliced-checkpoint"),))
    local = simulate(TINY, [1, 0, 0], faults=plan, seed=0, rounds=4, eval_every=1, device="cpu", batching="off")
    remote = simulate_distributed(TINY, [1, 0, 0], faults=plan, seed=0, rounds=4, eval_every=1)
    assert [r["peers"]["0"]["present"] for r in local.records] == [True, False, True, True]
    assert all(r["eval_loss"] is not None for r in remote.records)
    assert remote.records == local.records
