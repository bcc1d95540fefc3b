"""Each fault kind: the run survives, and the fault is accounted for by reason."""
import dataclasses
import math

import pytest
import torch

from sim.config import load_config
from sim.errors import ConfigError
from sim.faults import Fault, FaultPlan, parse_fault_spec
from sim.run import Network, simulate

TINY = load_config("tiny")
ROUNDS = 4


def run(*faults, config=TINY, tiers=(0, 1, 1), **kwargs):
    return simulate(config, list(tiers), faults=FaultPlan(tuple(faults)), seed=0, rounds=ROUNDS, **kwargs)


def healthy(result):
    """Finite everywhere, replicas identical, receivers agree on what counted."""
    for r in result.records:
        assert math.isfinite(r["eval_loss"]) and r["receivers_agree"] and r["replica_max_diff"] == 0.0, r
    assert all(torch.isfinite(t).all() for t in result.final_weights.values())


def test_a_dropped_payload_is_missing_from_its_round_only():
    result = run(Fault(1, 1, "drop"))
    healthy(result)
    assert [r["contributing_peers"] for r in result.records] == [3, 2, 3, 3]
    assert result.faults() == {"drop": 1} and not result.rejected()


def test_a_late_payload_is_rejected_as_stale_in_the_next_round():
    result = run(Fault(1, 1, "late"))
    healthy(result)
    assert [r["contributing_peers"] for r in result.records] == [3, 2, 3, 3]
    assert result.records[2]["rejected"] == {"stale_round": 1}


def test_a_duplicate_payload_is_applied_once():
    duplicated, clean = run(Fault(1, 1, "duplicate")), run()
    healthy(duplicated)
    assert duplicated.records[1]["rejected"] == {"duplicate": 1}
    assert [r["contributing_peers"] for r in duplicated.records] == [3, 3, 3, 3]
    assert all(torch.equal(duplicated.final_weights[n], t) for n, t in clean.final_weights.items())


def test_corrupt_bytes_are_rejected_by_the_checksum():
    result = run(Fault(2, 0, "corrupt", byte=12345))
    healthy(result)
    assert sum(result.rejected().values()) == 1 and set(result.rejected()) <= {"bad_checksum", "bad_magic"}
    assert result.records[2]["contributing_peers"] == 2


@pytest.mark.parametrize("quantized", [True, False], ids=["1bit-sender-guard", "fp32-receiver-check"])
def test_nan_never_reaches_a_weight(quantized):
    config = TINY.replace(distro=dataclasses.replace(TINY.distro, quantize_1bit=quantized))
    result = run(Fault(1, 2, "nan"), config=config)
    healthy(result)
    assert result.records[1]["rejected"] == {"non_finite": 1} and result.records[1]["contributing_peers"] == 2


def test_a_byzantine_payload_is_accepted_and_counted_as_a_fault():
    result = run(Fault(1, 1, "byzantine", byte=0))
    healthy(result)
    assert result.faults() == {"byzantine": 1} and not result.rejected()
    assert result.records[1]["contributing_peers"] == 3


@pytest.mark.parametrize("rejoin_from", ["checkpoint", "current"])
def test_churn_leaves_and_rejoins_at_another_tier_with_the_current_model(rejoin_from):
    result = run(Fault(1, 2, "churn", away=2, rejoin_from=rejoin_from, rejoin_tier=0))
    healthy(result)
    assert [r["peers"]["2"]["present"] for r in result.records] == [True, False, False, True]
    assert [r["contributing_peers"] for r in result.records] == [3, 2, 2, 3]
    assert result.records[0]["peers"]["2"]["tier"] == 1 and result.records[3]["peers"]["2"]["tier"] == 0


def test_seeded_random_fault_plans_are_survived_and_fully_accounted():
    result = simulate(TINY, [0, 1, 1, 0], faults="drop=0.1,late=0.1,duplicate=0.1,corrupt=0.1,nan=0.1,byzantine=0.1,churn=0.1",
                      seed=3, rounds=8)
    healthy(result)
    counts = result.faults()
    assert sum(counts.values()) > 0
    for r in result.records:
        assert r["contributing_peers"] >= 1


def test_fault_specs_are_validated():
    with pytest.raises(ConfigError, match="valid kinds are drop, late"):
        parse_fault_spec("meteor=0.1")
    with pytest.raises(ConfigError, match="outside \\[0, 1\\]"):
        parse_fault_spec("drop=1.5")
    with pytest.raises(ConfigError, match="add up to"):
        parse_fault_spec("drop=0.6,late=0.6")


def test_a_checkpoint_join_takes_the_current_weights_after_an_earlier_sliced_join(tmp_path):
    """Psyche's auto rule prefers a tier export beside a checkpoint: a peer that once came back
    from a sliced checkpoint must not find that old export (its round's weights) when it comes
    back later from a full checkpoint at the same tier (found by the reference property).
    Each join's checkpoint is gone once loaded."""
    network = Network(TINY, [0, 0, 0], seed=0, device="cpu", scratch=tmp_path)
    network.round(0, evaluate=False)
    network.leave(2)
    network.rejoin(2, via="sliced-checkpoint", tier=1)
    network.leave(2)
    network.round(1, evaluate=False)   # the weights move on while peer 2 is away
    network.rejoin(2, via="checkpoint", tier=1)
    current, back = network.peers[0].model.state_dict(), network.peers[2].model.state_dict()
    for name, tensor in back.items():
        assert torch.equal(tensor, current[name][tuple(slice(0, n) for n in tensor.shape)]), name
    assert list(tmp_path.iterdir()) == []
