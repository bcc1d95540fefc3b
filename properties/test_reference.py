"""Whole runs checked after every round against the exact reference (sim/reference.py).

Each round starts from the weights the replicas hold; the reference computes that round
on its own (its own narrow models, its own combination, its own DCT in compressed mode)
and then:
- the round's contributing peers are the payloads the fault plan lets count;
- every receiver's aggregate equals the reference's to 1e-9 of the tensor's largest
  element, and its sign agrees wherever the reference is clear of round-off (above that);
- every replica holds the reference's weights: exactly where the sign is clear; where the
  aggregate is round-off (or exactly zero: a token with no gradient inside a block that
  has one), a sign step may go either way, so the weights agree to 2 lr there;
- the round's record reports the reference's learning rate, each present peer's own
  training loss (absent peers none) and their mean, and (on an example's last round) the
  full model's loss on the held-out batch after the update: what every criterion reads.
Runs are float64; the next round starts from the replicas' weights again, so one
round's round-off never compounds into the next check.
"""
import dataclasses

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from properties.profiles import scaled
from properties.records import describe
from sim.aggregate import ApplyRule, MeanSemantics
from sim.config import ZERO_BLOCKS, DistroConfig, ModelConfig, load_config
from sim.faults import KINDS
from sim.reference import DeMo, held_out, learning_rate, loss_of, lossless_round, peer_loss, round_inputs
from sim.run import Network, fault_plan, play_round
from sim.schedule import (SCHEDULES, ConstantSchedule, CosineSchedule, LinearSchedule,
                          WarmupStableDecaySchedule)

TINY = load_config("tiny")
# The same size in the other style: relu² MLP with biases (gate/up biases slice with their
# rows), tied embeddings.
TINY_NANOGPT = TINY.replace(model=ModelConfig(**{**TINY.model.__dict__, "style": "nanogpt", "mlp_bias": True,
                                                 "tie_word_embeddings": True}))
CHUNK = TINY.distro.compression_chunk
LOSSLESS = DistroConfig(compression_chunk=CHUNK, compression_topk=CHUNK * CHUNK, quantize_1bit=False)
CLOSE = 1e-9   # of a tensor's largest aggregate element
SAME = 1e-12   # relative, for a scalar both sides compute in float64 in another order
# Where a compressed aggregate's terms cancel, its exact value is 0 and the simulator's decode
# (a weighted sum of basis blocks) leaves round-off of the terms' size: measured up to ~1e-17
# of a coefficient; 1e-6 of one at CLOSE is 1e-15, far below any real disagreement.
DECODE_ROUNDOFF = 1e-6


@st.composite
def schedules(draw):
    """Any of Psyche's four schedules, with boundaries inside a 3-5 round example (and
    Cosine's total_steps before its end: Psyche's cosine climbs back past it)."""
    warmup = draw(st.integers(0, 2))
    rates = dict(base_lr=draw(st.sampled_from([1e-2, 3e-3])), warmup_steps=warmup,
                 warmup_init_lr=draw(st.sampled_from([0.0, 1e-3])))
    kind = draw(st.sampled_from(sorted(SCHEDULES)))
    if kind == "Constant":
        return ConstantSchedule(**rates)
    if kind == "WarmupStableDecay":
        return WarmupStableDecaySchedule(**rates, stable_steps=draw(st.integers(0, 1)),
                                         cosine_decay_steps=draw(st.integers(0, 2)), cosine_decay_final_lr=1e-3,
                                         linear_decay_steps=draw(st.integers(0, 2)),
                                         linear_decay_final_lr=draw(st.sampled_from([0.0, 5e-4])))
    cls = LinearSchedule if kind == "Linear" else CosineSchedule
    return cls(**rates, total_steps=draw(st.integers(warmup + 1, 5)), final_lr=draw(st.sampled_from([1e-3, 0.0])))


peer_tiers = st.integers(0, 2) | st.tuples(st.integers(0, 2), st.integers(0, 2))


@st.composite
def reference_runs(draw, lossless: bool):
    model = draw(st.sampled_from([TINY, TINY_NANOGPT]))
    clip = draw(st.sampled_from([None, None, 0.5, 100.0]))   # 0.5 clips every peer, 100 none
    zeros = draw(st.sampled_from(ZERO_BLOCKS))
    if lossless:
        distro = dataclasses.replace(LOSSLESS, clip_grad_norm=clip, zero_blocks=zeros)
    else:
        distro = DistroConfig(compression_chunk=CHUNK, compression_topk=draw(st.integers(1, 8)),
                              quantize_1bit=draw(st.booleans()), compression_decay=draw(st.sampled_from([0.9, 0.999])),
                              clip_grad_norm=clip, zero_blocks=zeros)
    peers = draw(st.integers(1, 8))
    tiers = draw(st.lists(peer_tiers, min_size=peers, max_size=peers))
    fractions = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=peers, max_size=peers)) \
        if lossless else [0.0] * peers
    kinds = draw(st.lists(st.sampled_from(KINDS), unique=True, max_size=4))
    faults = ",".join(f"{k}={draw(st.sampled_from([0.1, 0.2]))}" for k in kinds)
    schedule = draw(schedules())
    ramp = draw(st.sampled_from([{}, {"global_batch_size_end": 8, "global_batch_size_warmup_tokens": 160}]))
    config = model.replace(distro=distro, lr_schedule=schedule, cold_start_warmup_steps=draw(st.sampled_from([0, 0, 0, 2])),
                           **ramp)
    return dict(config=config, tiers=tiers, fractions=fractions, faults=faults,
                semantics=draw(st.sampled_from(list(MeanSemantics))), shared=draw(st.booleans()),
                rule=draw(st.sampled_from([ApplyRule.SIGN, ApplyRule.SGD])),
                weight_decay=draw(st.sampled_from([0.0, 0.1])), rounds=draw(st.integers(3, 5)),
                seed=draw(st.integers(0, 2**16)))


def play(case, reference_round):
    """Run `case` round by round; `reference_round(network, before, peers, lr)` gives each
    round's reference, which the round must equal."""
    cfg = case["config"]
    describe(style=cfg.model.style, distro=cfg.distro.__dict__, tiers=[list(t) if isinstance(t, tuple) else t
                                                                        for t in case["tiers"]],
             helper_fractions=case["fractions"], faults=case["faults"], semantics=case["semantics"].value,
             shared_weights=case["shared"], apply_rule=case["rule"].value, weight_decay=case["weight_decay"],
             rounds=case["rounds"], seed=case["seed"], schedule=repr(cfg.lr_schedule),
             cold_start_warmup_steps=cfg.cold_start_warmup_steps, global_batch_size_end=cfg.global_batch_size_end,
             global_batch_size_warmup_tokens=cfg.global_batch_size_warmup_tokens)
    network = Network(cfg, case["tiers"], case["fractions"], case["seed"], semantics=case["semantics"],
                      shared_weights=case["shared"], apply_rule=case["rule"], weight_decay=case["weight_decay"],
                      device="cpu", dtype=torch.float64)
    plan = fault_plan(case["faults"], network, case["rounds"], case["seed"])
    evaluation = held_out(cfg, case["seed"])
    try:
        for round_ in range(case["rounds"]):
            before = {n: p.detach().clone() for n, p in network._full_replica().named_parameters()}
            last = round_ == case["rounds"] - 1   # one held-out forward an example: any round shows an eval bug
            record = play_round(network, plan, round_, evaluate=last)
            peers = round_inputs(cfg, case["seed"], case["tiers"], case["fractions"], plan, round_)
            lr = learning_rate(cfg, round_)
            expected = reference_round(network, before, peers, lr)
            assert record["contributing_peers"] == expected.contributing, (round_, record, expected.contributing)
            check_round(network, expected, lr, case["rule"], round_)
            after = {n: p.detach() for n, p in network._full_replica().named_parameters()}
            check_record(record, lr, {p.id: peer_loss(cfg.model, before, p) for p in peers},
                         loss_of(cfg.model, after, evaluation).item() if last else None, round_)
    finally:
        network.close()


def check_record(record, lr, losses, eval_loss, round_):
    """The round's metrics line against the reference's rate and losses."""
    assert record["lr"] == pytest.approx(lr, rel=SAME, abs=1e-300), f"round {round_}: lr {record['lr']} != {lr}"
    reported = {int(p): v["loss"] for p, v in record["peers"].items() if v["present"] and v["loss"] is not None}
    assert reported.keys() == losses.keys(), f"round {round_}: peers {sorted(reported)} reported, {sorted(losses)} trained"
    for peer, loss in losses.items():
        assert reported[peer] == pytest.approx(loss, rel=CLOSE), f"round {round_}, peer {peer}: loss {reported[peer]} != {loss}"
    assert all(v["loss"] is None for v in record["peers"].values() if not v["present"]), f"round {round_}: an absent peer's loss"
    assert record["loss"] == pytest.approx(sum(losses.values()) / len(losses), rel=CLOSE), f"round {round_}: mean loss"
    assert record["eval_loss"] == (None if eval_loss is None else pytest.approx(eval_loss, rel=CLOSE)), \
        f"round {round_}: held-out loss"


def check_round(network, expected, lr, rule, round_):
    for aggregate in network.aggregates:
        for name, want in expected.update.items():
            got, checked = aggregate.updates[name].to(want.dtype), _checked(expected, name, want)
            scale = max(want.abs().max().item(), expected.terms.get(name, 0.0) * DECODE_ROUNDOFF)
            error = ((got - want).abs() * checked).max().item()
            assert error <= CLOSE * scale + 1e-300, f"round {round_}, {name}: aggregate off by {error:.3g} (largest {scale:.3g})"
            clear = checked & (want.abs() > CLOSE * scale)
            assert torch.equal(got.sign()[clear], want.sign()[clear]), f"round {round_}, {name}: a sign differs"
    for replica in network.receivers():
        for name, param in replica.items():
            want, update = expected.weights[name], expected.update[name]
            scale, checked = update.abs().max().item(), _checked(expected, name, update)
            slack = torch.full_like(want, float("inf"))   # float64: a scalar's where() would be float32
            if rule is ApplyRule.SIGN:
                slack[checked] = 2 * lr * (1 + 1e-9)
                slack[checked & (update.abs() > CLOSE * scale)] = 1e-12
            else:
                slack[checked] = lr * CLOSE * scale + 1e-12
            off = (param.detach() - want).abs() - slack
            assert off.max().item() <= 0, f"round {round_}, {name}: a replica is {off.max().item():.3g} past the reference"


def _checked(expected, name, like):
    return torch.ones_like(like, dtype=torch.bool) if expected.checked is None else expected.checked[name]


# Pinned, so that what a draw meets only sometimes is met on every run: a peer that leaves in
# round 0 and comes back, with the current weights, in round 3 (seed 3's plan); Psyche's
# cold-start warmup over 2 rounds, its batch ramp (4, 6, then 8 sequences), clipping.
PINNED = dict(config=TINY.replace(distro=dataclasses.replace(LOSSLESS, clip_grad_norm=0.5), cold_start_warmup_steps=2,
                                  global_batch_size_end=8, global_batch_size_warmup_tokens=160),
              tiers=[0, 1, 0], fractions=[0.0] * 3, faults="churn=0.2", semantics=MeanSemantics.COEFF_MEAN,
              shared=False, rule=ApplyRule.SGD, weight_decay=0.0, rounds=4, seed=3)


@pytest.mark.slow
@scaled(0.1)
@example(case=PINNED)
@given(reference_runs(lossless=True))
def test_every_round_of_a_lossless_run_equals_the_exact_reference(case):
    """Random (per-layer) tiers, helper fractions, fault plans of every kind (churn too),
    mean semantics, apply rules, weight decay, replica or shared weights. Catches any wrong
    arithmetic between a peer's gradient and the replicas' weights: padding on the wrong
    axis or at the wrong end, a mean over the wrong count, a peer's payload zeroed, dropped
    or counted twice, a sign flipped, a parameter never updated, helpers misplaced."""
    cfg = case["config"]

    def reference(network, before, peers, lr):
        return lossless_round(cfg.model, CHUNK, before, peers, lr, case["semantics"].value, case["rule"].value,
                              case["weight_decay"], cfg.distro.zero_blocks)
    play(case, reference)


@pytest.mark.slow
@scaled(0.1)
@given(reference_runs(lossless=False))
def test_every_compressed_round_equals_an_independent_demo_step(case):
    """Compressed DisTrO (top-k of a few coefficients per block, 1-bit or not, error
    feedback over rounds) against DeMo's step written out independently, mixed tiers
    aligned in the block domain. Catches what lossless mode cannot: top-k choosing the
    wrong coefficients, error feedback dropped or reset, decay misapplied, a wrong DCT."""
    cfg, distro = case["config"], case["config"].distro
    demo = DeMo(distro.compression_chunk, distro.compression_topk, distro.compression_decay, distro.quantize_1bit,
                distro.zero_blocks)

    def reference(network, before, peers, lr):
        expected = demo.round(cfg.model, before, peers, lr, case["semantics"].value, case["rule"].value,
                              case["weight_decay"])
        for peer, name in demo.tied:   # a tied top-k may go either way: carry on from the simulator's choice
            demo.adopt(peer, name, network.peers[peer].state.delta[name])
        return expected
    play(case, reference)
