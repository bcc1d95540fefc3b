"""Psyche's data assignment (sim/assignment.py): which sequences each trainer trains."""
from hypothesis import given
from hypothesis import strategies as st

from sim.assignment import assign, deterministic_shuffle, round_seed
from sim.config import load_config
from sim.faults import FaultPlan, parse_fault_spec, plan_faults
from sim.run import Network, play_round

TINY = load_config("tiny")


@given(st.lists(st.integers(0, 50), unique=True, max_size=12), st.integers(1, 200), st.integers(0, 10**6),
       st.integers(0, 2**64 - 1))
def test_a_round_deals_its_batch_once_in_shares_that_differ_by_at_most_one(trainers, total, start, seed):
    """Catches: a remainder dropped or inflated, a sequence dealt twice, a trainer given another's
    share, a trainer with nothing listed as dealt."""
    dealt = assign(trainers, total, start, seed)
    indices = [i for span in dealt.values() for i in span]
    if not trainers:
        assert dealt == {}
        return
    assert sorted(indices) == list(range(start, start + total))
    sizes = [len(span) for span in dealt.values()]
    assert set(dealt) <= set(trainers) and all(sizes)
    assert max(sizes) - min(sizes) <= 1 and len(dealt) == min(len(trainers), total)


@given(st.lists(st.integers(), max_size=20), st.integers(0, 2**64 - 1))
def test_the_shuffle_is_a_permutation_fixed_by_its_seed(items, seed):
    shuffled = deterministic_shuffle(items, seed)
    assert sorted(shuffled) == sorted(items) and shuffled == deterministic_shuffle(items, seed)


# Printed by Psyche's own deterministic_shuffle (shared/core/src/deterministic_shuffle.rs and
# lcg.rs of psyche-elastic, compiled on their own with rustc) for 0..9; tests/test_psyche_code.py
# compiles them again where a checkout is given and compares many more seeds.
PSYCHE_SHUFFLES = {0: [6, 3, 8, 5, 0, 9, 2, 1, 4, 7], 42: [2, 1, 0, 6, 7, 5, 4, 9, 8, 3],
                   2**64 - 1: [9, 6, 5, 0, 2, 7, 3, 4, 1, 8]}


def test_the_shuffle_is_psyches():
    for seed, order in PSYCHE_SHUFFLES.items():
        assert deterministic_shuffle(range(10), seed) == order, seed


@given(st.integers(1, 8), st.sampled_from([1, 2, 3, 4, 5, 8]), st.sampled_from(["", "churn=0.2", "churn=0.3,drop=0.1"]),
       st.integers(0, 2**16))
def test_over_a_run_no_sequence_is_lost_or_trained_twice(peers, batch, faults, seed):
    """For any global batch, peer count and churn: the rounds' assignments tile the data indices
    0, 1, 2, ... with no gap and no overlap, each round dealt over the peers present then.
    Catches: an away peer's share lost, the data index advanced by the wrong count."""
    config = TINY.replace(global_batch_size=batch, global_batch_size_end=batch)
    network = Network(config, [0] * peers, seed=seed, device="cpu")
    plan = plan_faults(parse_fault_spec(faults), peers, 4, seed) if faults else FaultPlan()
    seen = []
    for round_ in range(4):
        for fault in plan.returning(round_):
            network.rejoin(fault.peer, "current", None)
        for fault in plan.leaving(round_):
            network.leave(fault.peer)
        dealt = network.assignment(round_)
        assert set(dealt) <= {p.id for p in network.present()}
        seen += [i for span in dealt.values() for i in span]
    assert sorted(seen) == seen == list(range(4 * batch))


def test_a_round_seed_depends_on_the_run_seed_and_the_round():
    assert len({round_seed(s, r) for s in range(4) for r in range(4)}) == 16
    assert all(0 <= round_seed(s, 0) < 2**64 for s in range(4))


def test_a_run_trains_every_sequence_of_its_global_batch_each_round():
    """3 peers, a global batch of 4: one trains 2 sequences, and all 4 go out."""
    network = Network(TINY, [0, 0, 0], seed=0, device="cpu")
    record = play_round(network, FaultPlan(), 0)
    assert sorted(p["sequences"] for p in record["peers"].values()) == [1, 1, 2]
