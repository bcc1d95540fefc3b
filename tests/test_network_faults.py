"""Psyche's network faults (--fault-latency-ms, --fault-packet-loss, --fault-bandwidth-limit,
--fault-seed; sim/faults.py NetworkFaults): the model on the simulated clock, the deadline
Psyche's round gives, determinism per client, and bad values refused in one line. Parity
with the distributed backend is in tests/test_distributed.py. No test here reads a clock:
delays are simulated milliseconds."""
import json

import pytest

from sim.config import load_config
from sim.faults import NetworkFaults, parse_network_faults
from sim.run import simulate
from tests.cli import matsim_here

TINY = load_config("tiny")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--fault-latency-ms", "50-x", "expected BASE or BASE-JITTER"),
    ("--fault-latency-ms", "-5", "expected BASE or BASE-JITTER"),
    ("--fault-latency-ms", "1-2-3", "expected BASE or BASE-JITTER"),
    ("--fault-packet-loss", "1.5", "expected a probability in [0, 1]"),
    ("--fault-packet-loss", "-0.1", "expected a probability in [0, 1]"),
    ("--fault-bandwidth-limit", "0", "expected bytes per second >= 1"),
    ("--fault-seed", "-1", "expected an integer >= 0"),
    ("--client-keep-steps", "0", "expected an integer >= 1"),
])
def test_a_bad_network_flag_is_one_line_exit_2_and_runs_nothing(tmp_path, flag, value, fragment):
    result = matsim_here("testnet", "start", "--config-path", "tiny", "--rounds", "2", "--out", str(tmp_path / "out"),
                         flag, value)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_payloads_delay_is_its_latency_plus_its_bytes_over_the_bandwidth_and_each_client_draws_from_seed_plus_i():
    fixed = NetworkFaults(base_ms=50, bandwidth=1000, seed=3)
    assert fixed.arrival(0, 0, 2500) == (50 + 2500, False)   # 2500 B at 1000 B/s: 2500 ms, floored as Psyche does
    jittered = NetworkFaults(base_ms=50, jitter_ms=20, seed=3)
    delays = [jittered.arrival(c, r, 0)[0] for c in range(4) for r in range(50)]
    assert min(delays) >= 30 and max(delays) <= 70 and len(set(delays)) > 10
    # client 1 of seed 3 is client 0 of seed 4: Psyche's local testnet passes seed + i to client i
    assert [jittered.arrival(1, r, 0) for r in range(20)] == \
        [NetworkFaults(base_ms=50, jitter_ms=20, seed=4).arrival(0, r, 0) for r in range(20)]
    lossy = [NetworkFaults(packet_loss=p, seed=0).arrival(c, r, 0)[1] for p in (0.0, 1.0) for c in range(3) for r in range(5)]
    assert lossy == [False] * 15 + [True] * 15


def test_parsing_follows_psyches_flags_and_no_flag_means_no_network_faults():
    assert parse_network_faults(None, None, None, None) is None
    assert parse_network_faults("50", None, None, None, run_seed=9) == NetworkFaults(50, 0, 0.0, None, 9)
    assert parse_network_faults("30-70", 0.1, 2048, 42) == NetworkFaults(30, 70, 0.1, 2048, 42)


def test_a_payload_past_the_rounds_deadline_arrives_next_round_as_stale():
    """Psyche's round: RoundTrain (max_round_train_time) then RoundWitness (round_witness_time).
    With a 1 s round, 10 s of latency puts every payload past it: none counts in its round, and
    each arrives in the next one, where it is stale."""
    run = TINY.replace(max_round_train_time=0.5, round_witness_time=0.5)
    result = simulate(run, [0, 1, 1], seed=0, rounds=3, device="cpu", network_faults=NetworkFaults(base_ms=10_000))
    assert all(link == {"delay_ms": 10_000, "fate": "late"} for r in result.records for link in r["network"].values())
    assert [r["contributing_peers"] for r in result.records] == [0, 0, 0]
    assert [r["rejected"].get("stale_round", 0) for r in result.records] == [0, 3, 3]
    on_time = simulate(TINY, [0, 1, 1], seed=0, rounds=3, device="cpu", network_faults=NetworkFaults(base_ms=10_000))
    assert [r["contributing_peers"] for r in on_time.records] == [3, 3, 3]   # tiny's round: 30 s + 2 s


def test_the_same_flags_give_the_same_records_and_scenario_json_names_them(tmp_path):
    argv = ["testnet", "start", "--config-path", "tiny", "--client-matformer-tiers", "0,1,1", "--rounds", "4",
            "--fault-latency-ms", "30-70", "--fault-packet-loss", "0.3", "--fault-seed", "42"]
    for name in ("a", "b"):
        assert matsim_here(*argv, "--out", str(tmp_path / name)).returncode == 0
    a, b = ((tmp_path / n / "metrics.jsonl").read_text() for n in ("a", "b"))
    assert a == b and '"fate": "lost"' in a
    scenario = json.loads((tmp_path / "a" / "scenario.json").read_text())
    assert scenario["network_faults"] == {"base_ms": 30, "jitter_ms": 70, "packet_loss": 0.3, "bandwidth": None,
                                          "seed": 42}


def test_client_checkpoints_keep_the_newest_steps(tmp_path):
    argv = ["testnet", "start", "--config-path", "tiny", "--client-matformer-tiers", "0,1", "--rounds", "5",
            "--checkpoint-every", "1", "--client-checkpoint-dir", str(tmp_path / "ckpt"), "--client-keep-steps", "2",
            "--out", str(tmp_path / "run")]
    assert matsim_here(*argv).returncode == 0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-4", "step-5"]
    assert (tmp_path / "ckpt" / "step-5" / "model.safetensors").read_bytes() == \
        (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes()
