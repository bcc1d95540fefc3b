"""The verification chapter's testnet scenarios on test-nanogpt-small, as tests.
(nanogpt-20m-run runs the same matrix in the nightly job.)"""
import pytest

from sim import oracle
from sim.config import load_config
from sim.run import simulate

CONFIG = load_config("test-nanogpt-small")
ROUNDS = CONFIG.total_steps


@pytest.fixture(scope="module")
def homogeneous():
    return simulate(CONFIG, [0, 0, 0], seed=0)


def test_homogeneous_baseline_loss_decreases_without_errors_and_every_client_completes(homogeneous):
    assert oracle.loss_decreases(homogeneous)
    assert oracle.no_errors(homogeneous)
    assert oracle.all_complete(homogeneous, ROUNDS)
    assert all(r["contributing_peers"] == 3 and r["replica_max_diff"] == 0.0 for r in homogeneous.records)


def test_heterogeneous_1to2_ends_within_15_percent_of_the_homogeneous_run(homogeneous):
    result = simulate(CONFIG, [0, 1, 1], seed=0)
    assert oracle.within_tolerance(result, homogeneous), oracle.relative_gap(result, homogeneous)
    assert oracle.no_errors(result) and oracle.all_complete(result, ROUNDS)
    assert all(r["replica_max_diff"] == 0.0 and r["receivers_agree"] for r in result.records)


def test_extreme_1to3_completes_and_its_loss_decreases():
    result = simulate(CONFIG, [0, 1, 1, 1], seed=0)
    assert oracle.all_complete(result, ROUNDS) and oracle.no_errors(result)
    assert oracle.loss_decreases(result)
