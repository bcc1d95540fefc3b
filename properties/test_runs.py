"""Whole runs under random tier assignments and fault plans, and a state machine
that drives a network rule by rule (join, leave, rejoin at another tier, drop or
corrupt a payload, run a round, checkpoint and restore).

The whole-run claim: a run under faults keeps its invariants (finite losses, replicas that
agree, a loss exactly from the peers dealt sequences), and ends at most `fault_gap_bound(cost)`
above the same seed's fault-free run, a bound that grows with what its faults cost in payloads
(`sim.oracle.fault_cost`, in rounds' worth: lost ones, byzantine ones twice, churns once,
each as a share of its round's payloads).
The bound is calibrated on correct code by scripts/calibrate_faults.py over cases of this
very strategy (docs/data/fault_gap.json: its seeds, the gaps seen, the false-alarm rate on
cases it was not fitted on). A run whose faults cost nothing is the fault-free run, bit for bit.
"""
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from properties.profiles import scaled
from properties.records import describe
from sim.config import load_config
from sim.faults import KINDS, Fault, FaultPlan
from sim.oracle import fault_cost
from sim.run import JOIN_VIA, Network, play_round, simulate

TINY = load_config("tiny")
ROUNDS = 6
FAULT_GAP = Path(__file__).resolve().parent.parent / "docs" / "data" / "fault_gap.json"


# A peer's tier: one for every layer, or one per layer (Mix'n'Match).
peer_tiers = st.integers(0, 2) | st.tuples(st.integers(0, 2), st.integers(0, 2))
helper_fractions = st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0])


@st.composite
def runs(draw):
    peers = draw(st.integers(1, 8))
    tiers = [0] + draw(st.lists(peer_tiers, min_size=peers - 1, max_size=peers - 1))
    kinds = draw(st.lists(st.sampled_from(KINDS), unique=True, max_size=4))
    spec = ",".join(f"{k}={draw(st.sampled_from([0.05, 0.1, 0.15]))}" for k in kinds)
    fractions = draw(st.lists(helper_fractions, min_size=peers, max_size=peers))
    return tiers, fractions, spec, draw(st.integers(0, 2**16))


def fault_gap_bound(cost: float) -> float:
    """The held-out loss a run may end above its fault-free twin, its faults having cost `cost`."""
    return json.loads(FAULT_GAP.read_text())["bound"]["per_round"] * cost


def play_pair(case):
    """(the run under its faults, the same seed's fault-free run)."""
    tiers, fractions, spec, seed = case
    runs_ = [simulate(TINY, tiers, fractions, faults=faults, seed=seed, rounds=ROUNDS, device="cpu")
             for faults in (spec, None)]
    return tuple(runs_)


@pytest.mark.slow
@scaled(0.05)
# The two plans a random draw found with the old claim ("the held-out loss falls over the run"):
# three rounds in a row with a single contributor; and a byzantine peer in a network of two.
@example(case=([0, 1, 0], [0.0, 0.0, 0.0], "churn=0.1,drop=0.05", 4))
@example(case=([0, 0], [0.0, 0.0], "byzantine=0.1", 849))
@example(case=([0], [0.0], "nan=0.1", 3))   # a lone peer's round lost: the calibration once missed it
@given(runs())
def test_random_tiers_and_faults_keep_the_invariants_and_cost_at_most_what_they_lose(case):
    """Random (per-layer) tiers, helper fractions and fault plans. Catches: NaN reaching
    weights, a peer silently skipped, a loss reported for a peer that trained nothing, a fault
    that costs the network more than the payloads it lost (a stall, a poisoned replica)."""
    tiers, fractions, spec, seed = case
    describe(tiers=[list(t) if isinstance(t, tuple) else t for t in tiers], helper_fractions=fractions,
             faults=spec, seed=seed, rounds=ROUNDS, config="tiny")
    run, clean = play_pair(case)
    for record in run.records:
        assert math.isfinite(record["eval_loss"]) and record["replica_max_diff"] == 0.0
        for peer in record["peers"].values():
            assert peer["present"] or (peer["loss"] is None and peer["sequences"] == 0)
            assert (peer["loss"] is not None) == (peer["sequences"] > 0)
            assert peer["loss"] is None or math.isfinite(peer["loss"])
    cost = fault_cost(run, clean)
    gap = run.final_eval_loss - clean.final_eval_loss
    if cost == 0:   # duplicates, and faults that fell on no payload, change nothing
        assert all(torch.equal(run.final_weights[n], clean.final_weights[n]) for n in run.final_weights), spec
    assert gap <= fault_gap_bound(cost), f"faults costing {cost:.3f} rounds' payloads cost {gap:.4f} of held-out loss"


@pytest.mark.slow
@scaled(0.05)
@given(runs(), st.data())
def test_a_churned_peer_comes_back_with_the_current_weights_an_empty_state_and_its_new_tier(case, data):
    """Churn, rejoin by rejoin, against rejoin written out: the peer leaves (Psyche deals its
    share of each round to the peers present), and comes back holding exactly a present
    replica's weights (copied, or through a full or a sliced checkpoint: the prefix), a fresh
    DisTrO state and its new tier, with helper mode off after a sliced checkpoint. The two
    runs must agree bit for bit. Catches: a stale replica or residual brought back, the old
    tier kept, a donor that is not current."""
    tiers, fractions, _, seed = case
    assume(len(tiers) >= 2)   # someone must stay
    peer = data.draw(st.integers(0, len(tiers) - 1))
    leave, away = data.draw(st.integers(0, ROUNDS - 2)), data.draw(st.integers(1, 3))
    churn = Fault(leave, peer, "churn", away=away, rejoin_from=data.draw(st.sampled_from(JOIN_VIA)),
                  rejoin_tier=data.draw(st.integers(0, 2)))
    describe(tiers=[list(t) if isinstance(t, tuple) else t for t in tiers], helper_fractions=fractions, seed=seed,
             churn=churn.__dict__)
    plan = FaultPlan((churn,))
    by_plan, by_hand = (Network(TINY, tiers, fractions, seed, device="cpu") for _ in range(2))
    for round_ in range(ROUNDS):
        a = play_round(by_plan, plan, round_, evaluate=True)
        if round_ == churn.round:
            by_hand.leave(peer)
        if round_ == churn.round + churn.away:
            _rejoin_by_hand(by_hand, churn)
        b = by_hand.round(round_, evaluate=True)
        b = {**b, "faults": {**b["faults"], "churn": 1}} if round_ == churn.round else b
        assert a == b, round_
    for mine, theirs in zip(by_plan.receivers(), by_hand.receivers()):
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)


def _rejoin_by_hand(network, churn):
    """What rejoining is, written out against Network's own pieces."""
    from sim.checkpoint import export_tiers, load_checkpoint, save_checkpoint
    from sim.distro import DistroState
    from sim.tiers import layer_tiers
    peer = network.peers[churn.peer]
    peer.tiers = layer_tiers(churn.rejoin_tier, TINY.model.num_hidden_layers)
    peer.state = DistroState.fresh(TINY.distro)
    donor = next(p.model for p in network.present() if p.model.stored_widths == (TINY.model.intermediate_size,) * 2)
    with tempfile.TemporaryDirectory() as tmp:
        if churn.rejoin_from == "current":
            model = type(donor)(donor.cfg, donor.stored_widths)
            model.load_state_dict(donor.state_dict())
        else:
            path = save_checkpoint(donor, Path(tmp) / "full")
            if churn.rejoin_from == "sliced-checkpoint" and churn.rejoin_tier > 0:
                path = export_tiers(path, [churn.rejoin_tier])[0]
            model = load_checkpoint(path, churn.rejoin_tier, "auto", device="cpu")[0]
            if churn.rejoin_from == "sliced-checkpoint" and churn.rejoin_tier > 0:
                peer.helper_fraction = 0.0
    peer.model = model.set_tiers(peer.tiers)
    network.away.discard(churn.peer)


class WholeRun(RuleBasedStateMachine):
    """Invariants after every rule: replicas agree on every shared element, counts
    match what was sent and what went wrong, everything is finite."""

    def __init__(self):
        super().__init__()
        self.network = Network(TINY, [0, 1], [0.0, 0.5], seed=0, device="cpu")
        self.round, self.pending, self.last = 0, {}, None
        self.saved = Path(tempfile.mkdtemp(prefix="matsim-sm-")) / "ckpt"
        self.has_checkpoint = False

    def teardown(self):
        shutil.rmtree(self.saved.parent)

    @rule(tier=peer_tiers, fraction=helper_fractions, via=st.sampled_from(JOIN_VIA))
    def join(self, tier, fraction, via):
        self.network.join(tier, via, fraction)

    @precondition(lambda self: any(self.network.may_leave(p.id) for p in self.network.present()))
    @rule(data=st.data())
    def leave(self, data):
        self.network.leave(data.draw(st.sampled_from([p.id for p in self.network.present()
                                                      if self.network.may_leave(p.id)])))

    @precondition(lambda self: self.network.away)
    @rule(data=st.data(), tier=st.integers(0, 2), via=st.sampled_from(JOIN_VIA))
    def rejoin(self, data, tier, via):
        self.network.rejoin(data.draw(st.sampled_from(sorted(self.network.away))), via, tier)

    @rule(data=st.data(), kind=st.sampled_from(["drop", "corrupt"]))
    def break_a_payload(self, data, kind):
        peer = data.draw(st.sampled_from([p.id for p in self.network.present()]))
        self.pending[peer] = Fault(self.round, peer, kind, byte=data.draw(st.integers(0, 2**20)))

    @rule()
    def run_a_round(self):
        trainers = self.network.assignment(self.round)   # present peers dealt sequences this round
        broken = {p: f for p, f in self.pending.items() if p in trainers}
        self.last = self.network.round(self.round, broken)
        self.round, self.pending = self.round + 1, {}
        assert self.last["contributing_peers"] == len(trainers) - len(broken)
        assert sum(self.last["rejected"].values()) == sum(f.kind == "corrupt" for f in broken.values())
        assert {int(p) for p, v in self.last["peers"].items() if v["loss"] is not None} == set(trainers)
        assert self.last["receivers_agree"]

    @rule()
    def checkpoint(self):
        self.network.checkpoint(self.saved)
        self.has_checkpoint = True

    @precondition(lambda self: self.has_checkpoint)
    @rule()
    def restore(self):
        self.network.restore(self.saved)

    @invariant()
    def replicas_agree_and_everything_is_finite(self):
        from sim.run import _replica_max_diff
        assert _replica_max_diff(self.network.receivers()) == 0.0
        assert all(math.isfinite(v.abs().max().item()) for v in self.network.weights().values())
        if self.last:
            assert math.isfinite(self.last["eval_loss"])


WholeRun.TestCase.settings = settings(max_examples=max(2, settings.default.max_examples // 20),
                                      stateful_step_count=12, deadline=None)
test_whole_run_state_machine = pytest.mark.slow(WholeRun.TestCase)
