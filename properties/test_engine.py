"""Batched peers (sim/engine.py) against the serial path, the definition, in float64.

Every round of random whole runs (per-layer tiers, helper fractions, fault plans, both
weight modes): each group of peers of one shape is trained both ways from the same state,
and every peer's gradients, loss and payload must agree to 1e-12. A whole run batched and
the same run serial, compared round by round from the same weights, give the same records
and aggregates; and a batched run is bit-reproducible with itself.
"""
import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.profiles import scaled
from properties.records import describe
from sim.config import load_config
from sim.engine import batched_gradients, groups, train_group
from sim.faults import KINDS
from sim.peer import gradients
from sim.run import Network, fault_plan, play_round

TINY = load_config("tiny")
CLOSE = 1e-12


@st.composite
def engine_runs(draw):
    peers = draw(st.integers(2, 8))
    # Few distinct shapes, so that groups form: a tier for all layers, sometimes one per layer.
    tiers = draw(st.lists(st.sampled_from([0, 1, 2, (0, 1)]), min_size=peers, max_size=peers))
    fractions = draw(st.lists(st.sampled_from([0.0, 0.0, 0.5]), min_size=peers, max_size=peers))
    kinds = draw(st.lists(st.sampled_from(KINDS), unique=True, max_size=3))
    faults = ",".join(f"{k}={draw(st.sampled_from([0.1, 0.2]))}" for k in kinds)
    quantized = draw(st.booleans())
    # Batches of several sequences a peer, split into micro-batches as Psyche's trainer splits them.
    batch = draw(st.sampled_from([4, 8, 12]))
    config = TINY.replace(distro=TINY.distro.__class__(**{**TINY.distro.__dict__, "quantize_1bit": quantized}),
                          global_batch_size=batch, global_batch_size_end=batch,
                          micro_batch_size=draw(st.sampled_from([None, None, 1, 2, 3])))
    return dict(config=config, tiers=tiers, fractions=fractions, faults=faults, shared=draw(st.booleans()),
                rounds=draw(st.integers(2, 4)), seed=draw(st.integers(0, 2**16)))


def network_of(case, batching="off"):
    describe(tiers=[list(t) if isinstance(t, tuple) else t for t in case["tiers"]], helper_fractions=case["fractions"],
             faults=case["faults"], shared_weights=case["shared"], quantize_1bit=case["config"].distro.quantize_1bit,
             global_batch_size=case["config"].global_batch_size, micro_batch_size=case["config"].micro_batch_size,
             rounds=case["rounds"], seed=case["seed"])
    return Network(case["config"], case["tiers"], case["fractions"], case["seed"], shared_weights=case["shared"],
                   device="cpu", dtype=torch.float64, batching=batching)


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300) if a.numel() else 1.0
    assert a.shape == b.shape and (a.numel() == 0 or (a - b).abs().max().item() <= CLOSE * scale), what


def same_payload(serial, batched, what: str) -> None:
    (a, loss_a), (b, loss_b) = serial, batched
    assert math.isclose(loss_a, loss_b, rel_tol=CLOSE), (what, loss_a, loss_b)
    assert (a is None) == (b is None), f"{what}: withheld by one path only"
    if a is None:
        return
    assert (a.peer, a.round, a.tiers, a.quantized) == (b.peer, b.round, b.tiers, b.quantized), what
    for mine, theirs in ((a.params, b.params), (a.helper_params, b.helper_params)):
        assert mine.keys() == theirs.keys(), what
        for name in mine:
            assert torch.equal(mine[name].indices, theirs[name].indices), f"{what}, {name}: other coefficients sent"
            close(mine[name].values, theirs[name].values, f"{what}, {name}")
    assert a.helper_neurons.keys() == b.helper_neurons.keys(), what
    assert all(torch.equal(a.helper_neurons[k], b.helper_neurons[k]) for k in a.helper_neurons), what


@pytest.mark.slow
@scaled(0.1)
@given(engine_runs())
def test_batched_peers_compute_the_gradients_and_send_the_payloads_each_would_alone(case):
    """Catches: a peer's batch paired with another peer's weights or results, a group mixing
    shapes, a gradient scaled by the group, helper neurons lost, micro-batches weighed
    otherwise than the serial definition does."""
    network = network_of(case)
    plan = fault_plan(case["faults"], network, case["rounds"], case["seed"])
    for round_ in range(case["rounds"]):
        for fault in plan.returning(round_):
            network.rejoin(fault.peer, fault.rejoin_from, fault.rejoin_tier)
        for fault in plan.leaving(round_):
            network.leave(fault.peer)
        faults = plan.on_payloads(round_)
        trainers = [p for p in network.present() if p.id in network.assignment(round_)]
        for group, _ in groups(network, trainers, round_, "on"):
            if len(group) < 2:
                continue
            models = [network.shared if network.shared is not None else p.model for p in group]
            for model, peer in zip(models, group):
                model.set_tiers(peer.tiers).set_helpers(network.helpers(peer, round_))
            tokens = network.tokens(group, round_)
            micro = network.config.micro_batch_size
            serial, serial_losses = gradients(models, tokens, micro)
            batched, batched_losses = batched_gradients(models[0], None if network.shared is not None else models,
                                                        tokens, micro)
            assert serial.keys() == batched.keys()
            for name in serial:
                close(serial[name], batched[name], f"round {round_}, gradient of {name}")
            for peer, a, b in zip(group, serial_losses, batched_losses):
                assert math.isclose(a, b, rel_tol=CLOSE), f"round {round_}, peer {peer.id}: loss {a} != {b}"
            before = [copy.deepcopy(p.state) for p in group]
            one_by_one = train_group(network, group, round_, faults, batched=False)
            stepped = [p.state for p in group]
            for peer, state in zip(group, before):
                peer.state = copy.deepcopy(state)
            together = train_group(network, group, round_, faults, batched=True)
            for peer, state in zip(group, stepped):
                assert state.delta.keys() == peer.state.delta.keys(), f"round {round_}, peer {peer.id}: other states"
                for name, delta in state.delta.items():
                    close(delta, peer.state.delta[name], f"round {round_}, peer {peer.id}, DisTrO state of {name}")
            for peer, a, b in zip(group, one_by_one, together):
                same_payload(a, b, f"round {round_}, peer {peer.id}")
            for peer, state in zip(group, before):   # the round itself starts from here
                peer.state = state
        network.round(round_, faults)


@pytest.mark.slow
@scaled(0.05)
@given(engine_runs())
def test_a_batched_run_gives_the_serial_runs_records_and_aggregates_and_repeats_itself_bit_for_bit(case):
    """Round by round from the same weights and DisTrO states, a batched and a serial network
    record the same losses and counts and aggregate the same update (its signs equal wherever
    it is clear of round-off). Then the batched run, played twice in float32, writes the same
    bytes. Catches: batching that changes what a round does (a peer left out of its group,
    results reordered), or that depends on anything but the seed."""
    serial, batched = network_of(case, "off"), network_of(case, "on")
    plan = fault_plan(case["faults"], serial, case["rounds"], case["seed"])
    for round_ in range(case["rounds"]):
        a, b = play_round(serial, plan, round_, evaluate=True), play_round(batched, plan, round_, evaluate=True)
        assert _counts(a) == _counts(b), round_
        losses = [(a["loss"], b["loss"]), (a["eval_loss"], b["eval_loss"])] + [
            (p["loss"], b["peers"][k]["loss"]) for k, p in a["peers"].items() if p["loss"] is not None]
        assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in losses), (round_, losses)
        for mine, theirs in zip(serial.aggregates, batched.aggregates):
            for name, update in mine.updates.items():
                scale = update.abs().max().item()
                assert (update - theirs.updates[name]).abs().max().item() <= 1e-9 * scale + 1e-300, (round_, name)
                clear = update.abs() > 1e-9 * scale
                assert torch.equal(update.sign()[clear], theirs.updates[name].sign()[clear]), (round_, name)
        # Carry on from the same state: round-off-level aggregates may step either way.
        _adopt(batched, serial)
    from sim.run import simulate
    cfg, args = case["config"], (case["tiers"], case["fractions"], case["faults"], case["seed"])
    runs = [simulate(cfg, *args, rounds=case["rounds"], shared_weights=case["shared"], device="cpu", batching="on",
                     eval_every=1).records for _ in range(2)]
    assert runs[0] == runs[1]


def _counts(record):
    """A round's record without its losses."""
    peers = {k: {f: v for f, v in p.items() if f != "loss"} | {"loss": p["loss"] is not None}
             for k, p in record["peers"].items()}
    return {k: v for k, v in record.items() if k not in ("loss", "eval_loss")} | {"peers": peers}


def _adopt(network, source):
    """`network` takes `source`'s weights and DisTrO states."""
    with torch.no_grad():
        pairs = [(network.shared, source.shared)] if network.shared is not None else \
            [(p.model, q.model) for p, q in zip(network.peers, source.peers)]
        for mine, theirs in pairs:
            if mine is not None and theirs is not None:
                for p, q in zip(mine.parameters(), theirs.parameters()):
                    p.copy_(q)
    for p, q in zip(network.peers, source.peers):
        p.state = copy.deepcopy(q.state)
