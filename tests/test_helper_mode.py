"""Helper mode and Mix'n'Match through whole runs (issue: helper mode at every tier)."""
import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from sim.config import load_config
from sim.errors import ConfigError
from sim.run import Network, simulate

TINY = load_config("tiny")


def finite_and_consistent(result):
    for record in result.records:
        assert record["replica_max_diff"] == 0.0 and record["receivers_agree"], record
        assert all(p["loss"] is not None and math.isfinite(p["loss"]) for p in record["peers"].values())
    assert all(map(math.isfinite, result.eval_losses))


@pytest.mark.parametrize("config", ["tiny", "test-nanogpt-small"])
def test_tiers_0_1_2_with_helper_fractions_0_half_quarter_complete_finite_with_nothing_rejected(config):
    run = load_config(config)
    helped = simulate(run, [0, 1, 2], [0, 0.5, 0.25], seed=3, rounds=4, device="cpu")
    plain = simulate(run, [0, 1, 2], [0, 0, 0], seed=3, rounds=4, device="cpu")
    finite_and_consistent(helped)
    assert not helped.rejected() and all(r["contributing_peers"] == 3 for r in helped.records)
    assert all(r["peers"]["1"]["helper"] == 0.5 for r in helped.records)
    # The helper slabs travel: more bytes than the same run without them, and other weights.
    assert helped.records[0]["bytes_sent"] > plain.records[0]["bytes_sent"]
    assert any(not torch.equal(helped.final_weights[n], t) for n, t in plain.final_weights.items())


def test_mix_n_match_per_layer_tiers_with_helpers_train_whole_runs():
    tiers = [0, (1, 2), (2, 0), (0, 1)]
    result = simulate(TINY, tiers, [0, 0.5, 0.25, 1.0], faults="drop=0.1,corrupt=0.1", seed=5, rounds=6, device="cpu")
    finite_and_consistent(result)
    assert result.final_eval_loss < result.eval_losses[0]
    assert result.records[0]["peers"]["1"]["tier"] == [1, 2]
    shared = simulate(TINY, tiers, [0, 0.5, 0.25, 1.0], faults="drop=0.1,corrupt=0.1", seed=5, rounds=6,
                      shared_weights=True, device="cpu")
    assert all(torch.equal(shared.final_weights[n], t) for n, t in result.final_weights.items())


def test_a_peer_joining_from_a_sliced_checkpoint_has_helper_mode_auto_disabled_with_the_reason_logged(caplog):
    network = Network(TINY, [0, 1], [0, 0.5], seed=0, device="cpu")
    network.round(0)
    with caplog.at_level(logging.WARNING):
        sliced = network.join(1, via="sliced-checkpoint", helper_fraction=0.5)
    full = network.join(1, via="checkpoint", helper_fraction=0.5)
    assert "auto-disabled: a sliced checkpoint holds no suffix neurons" in caplog.text
    assert network.peers[sliced].helper_fraction == 0.0 and network.peers[full].helper_fraction == 0.5
    assert network.peers[sliced].model.stored_widths == (32, 32)
    for round_ in (1, 2):  # the sliced peer is a receiver too: it holds the prefix of every update
        record = network.round(round_)
        assert record["replica_max_diff"] == 0.0 and not record["rejected"], record
    assert record["peers"][str(sliced)]["helper"] == 0.0


def test_helper_indices_are_the_same_in_another_process():
    """No communication: a fresh interpreter derives the same neurons from (seed, round, layer)."""
    code = ("import json; from sim.helper import helper_indices; "
            "print(json.dumps([helper_indices(7, r, l, 128, 512, 0.3, 3).tolist() for r in range(7) for l in range(3)]))")
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      timeout=120).stdout)
    from sim.helper import helper_indices
    assert other == [helper_indices(7, r, l, 128, 512, 0.3, 3).tolist() for r in range(7) for l in range(3)]


@pytest.mark.parametrize("interval", [0, -3])
def test_a_rotation_interval_below_1_is_a_config_error(interval):
    with pytest.raises(ConfigError, match=f"helper_rotation_interval {interval} is invalid"):
        TINY.replace(helper_rotation_interval=interval)
