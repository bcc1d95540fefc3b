"""Whole runs checked after every round against the exact reference (sim/reference.py).

Each round starts from the weights the replicas hold; the reference computes that round
on its own (its own narrow models, its own combination, its own DCT in compressed mode,
its own AdamW moments) and then:
- the round's contributing peers are the payloads the fault plan lets count;
- every receiver's aggregate equals the reference's to `bound` of the size of what went into
  it (`Round.scale`: the largest input to the counted peers' DisTrO steps), and its sign
  agrees wherever the reference is clear of that bound;
- every replica (narrow ones from sliced checkpoints: their prefix) holds the reference's
  weights: a sign step exactly (to the weights' own round-off) where the sign is clear,
  and to 2 lr where the aggregate is round-off; an SGD or AdamW step to the bound carried
  through the rule;
- the round's record reports the reference's learning rate, each trained peer's own loss
  (absent peers, and present ones dealt no sequence, none) and their mean, and (on an
  example's last round) the full model's loss on the held-out batch after the update.

Round-off bounds (`bound`), relative to a tensor's scale: FLOAT64_ROUND_OFF and
FLOAT32_ROUND_OFF for runs of those dtypes (the reference always computes in float64; see the
constants for how they were measured). The next round starts from the replicas' weights again, so one round's round-off
never compounds into the next check. A compressed round's top-k choices that round-off could
make either way (ties, signs of coefficients within round-off of 0) are left unchecked and
the reference adopts the implementation's residual there.

What the strategy draws: both model styles, chunk 16 (tiers 0-2) or 8 (tiers 0-3), lossless
or compressed DisTrO (1-bit or not, sent or absent zero blocks), helper fractions in both,
per-layer tiers, clipping, the three mean semantics, the apply rules sign, SGD and AdamW,
weight decay, Psyche's four schedules down to rate 0, cold start, batch ramp, micro-batches,
replica or shared weights, batching auto/on/off, float64 or float32, and fault plans of every
kind: churn rejoining through every checkpoint strategy, rounds where no payload counts, and
two faults on one peer in one round.
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
from sim.faults import KINDS, STAGES, Fault, FaultPlan, parse_fault_spec, plan_faults
from sim.reference import ffn_axis, held_out, learning_rate, loss_of, lossless_round, peer_loss, round_inputs
from sim.reference_demo import DeMo
from sim.run import Network, play_round
from sim.schedule import (SCHEDULES, ConstantSchedule, CosineSchedule, LinearSchedule,
                          WarmupStableDecaySchedule)

TINY = load_config("tiny")
# The same size in the other style: relu² MLP with biases (gate/up biases slice with their
# rows), tied embeddings.
TINY_NANOGPT = TINY.replace(model=ModelConfig(**{**TINY.model.__dict__, "style": "nanogpt", "mlp_bias": True,
                                                 "tie_word_embeddings": True}))
# The bounds on an aggregate's error, relative to its scale (`Round.scale`). Measured on correct
# code by scripts/round_off.py (results/round_off.json: the largest error over scale seen in
# every aggregate of random cases of these strategies): float64 ~7e-15, float32 ~7e-7, a float32
# gradient against the reference's float64 one from the same weights being most of it. Each
# bound leaves over 10x headroom over what was seen, and stays far below what a bug of the
# catalog moves an aggregate by (1e-3 of its scale or more; float16 values on the wire, the
# float32-only planted bug, ~5e-4 of each value).
FLOAT64_ROUND_OFF = 1e-11
FLOAT32_ROUND_OFF = 1e-5
ROUND_OFF = {torch.float64: FLOAT64_ROUND_OFF, torch.float32: FLOAT32_ROUND_OFF}
# Losses and a scalar both sides compute in another order: relative, per dtype.
SAME = {torch.float64: 1e-12, torch.float32: 1e-5}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


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


@st.composite
def fault_plans(draw, peers: int, rounds: int, deepest: int, seed: int) -> FaultPlan:
    """A plan drawn from rates as runs draw them, and then, sometimes, a round where every
    payload is dropped, and second faults on a peer (of another stage than its first)."""
    kinds = draw(st.lists(st.sampled_from(KINDS), unique=True, max_size=4))
    spec = ",".join(f"{k}={draw(st.sampled_from([0.1, 0.2]))}" for k in kinds)
    plan = plan_faults(parse_fault_spec(spec), peers, rounds, seed, deepest)
    faults = list(plan.faults)
    if draw(st.booleans()):   # no payload of this round counts
        blackout = draw(st.integers(0, rounds - 1))
        faults = [f for f in faults if not (f.round == blackout and STAGES.get(f.kind) == 3)]
        faults += [Fault(blackout, p, "drop") for p in range(peers) if p not in plan.away(blackout)]
    for _ in range(draw(st.integers(0, 2))):   # a second fault on one peer
        acting = [f for f in faults if f.kind != "churn"]
        if not acting:
            break
        first = draw(st.sampled_from(acting))
        taken = {STAGES[f.kind] for f in faults if (f.round, f.peer) == (first.round, first.peer) and f.kind != "churn"}
        free = [k for k in KINDS if k != "churn" and STAGES[k] not in taken]
        if free:
            faults.append(Fault(first.round, first.peer, draw(st.sampled_from(free)), byte=draw(st.integers(0, 2**20))))
    return FaultPlan(tuple(faults), plan.rates)


@st.composite
def reference_runs(draw, lossless: bool):
    model = draw(st.sampled_from([TINY, TINY_NANOGPT]))
    chunk = draw(st.sampled_from([16, 8]))   # 8 lines up tier 3's 8 neurons with every wider tier's blocks
    deepest = 3 if chunk == 8 else 2
    clip = draw(st.sampled_from([None, None, 0.5, 100.0]))   # 0.5 clips every peer, 100 none
    zeros = draw(st.sampled_from(ZERO_BLOCKS))
    if lossless:
        distro = DistroConfig(compression_chunk=chunk, compression_topk=chunk * chunk, quantize_1bit=False,
                              clip_grad_norm=clip, zero_blocks=zeros)
    else:
        distro = DistroConfig(compression_chunk=chunk, compression_topk=draw(st.integers(1, 8)),
                              quantize_1bit=draw(st.booleans()), compression_decay=draw(st.sampled_from([0.9, 0.999])),
                              clip_grad_norm=clip, zero_blocks=zeros)
    peers = draw(st.integers(1, 8))
    one = st.integers(0, deepest)
    tiers = draw(st.lists(one | st.tuples(one, one), min_size=peers, max_size=peers))
    fractions = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=peers, max_size=peers))
    rounds, seed = draw(st.integers(3, 5)), draw(st.integers(0, 2**16))
    plan = draw(fault_plans(peers, rounds, deepest, seed))
    ramp = draw(st.sampled_from([{}, {"global_batch_size_end": 8, "global_batch_size_warmup_tokens": 160}]))
    # Micro-batches of 3 split the 16 held-out sequences unequally (5 pieces of 3, then 1).
    config = model.replace(distro=distro, lr_schedule=draw(schedules()), micro_batch_size=draw(st.sampled_from(
        [None, None, 1, 2, 3])), cold_start_warmup_steps=draw(st.sampled_from([0, 0, 0, 2])),
        helper_rotation_interval=draw(st.sampled_from([1, 2, 4])), **ramp)
    return dict(config=config, tiers=tiers, fractions=fractions, plan=plan,
                semantics=draw(st.sampled_from(list(MeanSemantics))), shared=draw(st.booleans()),
                rule=draw(st.sampled_from(list(ApplyRule))), weight_decay=draw(st.sampled_from([0.0, 0.1])),
                rounds=rounds, seed=seed, batching=draw(st.sampled_from(["auto", "on", "off"])),
                dtype=draw(st.sampled_from(["float64", "float64", "float32"])))


def play(case, reference_round, observed: list | None = None):
    """Run `case` round by round; `reference_round(network, before, peers, lr, moments)` gives
    each round's reference, which the round must equal. `observed` collects every aggregate's
    error over its scale (scripts/round_off.py measures the bounds with it)."""
    cfg, dtype = case["config"], DTYPES[case["dtype"]]
    describe(style=cfg.model.style, distro=cfg.distro.__dict__, tiers=[list(t) if isinstance(t, tuple) else t
                                                                        for t in case["tiers"]],
             helper_fractions=case["fractions"], faults=[dataclasses.asdict(f) for f in case["plan"].faults],
             semantics=case["semantics"].value, shared_weights=case["shared"], apply_rule=case["rule"].value,
             weight_decay=case["weight_decay"], rounds=case["rounds"], seed=case["seed"], schedule=repr(cfg.lr_schedule),
             cold_start_warmup_steps=cfg.cold_start_warmup_steps, global_batch_size_end=cfg.global_batch_size_end,
             global_batch_size_warmup_tokens=cfg.global_batch_size_warmup_tokens,
             micro_batch_size=cfg.micro_batch_size, helper_rotation_interval=cfg.helper_rotation_interval,
             batching=case["batching"], dtype=case["dtype"])
    network = Network(cfg, case["tiers"], case["fractions"], case["seed"], semantics=case["semantics"],
                      shared_weights=case["shared"], apply_rule=case["rule"], weight_decay=case["weight_decay"],
                      device="cpu", dtype=dtype, batching=case["batching"])
    plan, evaluation, moments, history = case["plan"], held_out(cfg, case["seed"]), {}, {}
    for round_ in range(case["rounds"]):
        before = {n: p.detach().double().clone() for n, p in network._full_replica().named_parameters()}
        last = round_ == case["rounds"] - 1   # one held-out forward an example: any round shows an eval bug
        try:   # a valid run completes: its breaking is a failure of the law, not of the test
            record = play_round(network, plan, round_, evaluate=last)
        except Exception as err:
            raise AssertionError(f"round {round_}: the run broke: {err!r}") from err
        peers = round_inputs(cfg, case["seed"], case["tiers"], case["fractions"], plan, round_, case["shared"])
        lr = learning_rate(cfg, round_)
        expected = reference_round(network, before, peers, lr, moments)
        assert record["contributing_peers"] == expected.contributing, (round_, record, expected.contributing)
        check_round(network, expected, lr, case["rule"], round_, dtype, history, observed)
        _adopt_moments(network, expected, moments)
        after = {n: p.detach().double() for n, p in network._full_replica().named_parameters()}
        check_record(record, lr, {p.id: peer_loss(cfg.model, before, p) for p in peers},
                     loss_of(cfg.model, after, evaluation).item() if last else None, round_, dtype)


def check_record(record, lr, losses, eval_loss, round_, dtype):
    """The round's metrics line against the reference's rate and losses."""
    same = SAME[dtype]
    assert record["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-300), f"round {round_}: lr {record['lr']} != {lr}"
    reported = {int(p): v["loss"] for p, v in record["peers"].items() if v["present"] and v["loss"] is not None}
    assert reported.keys() == losses.keys(), f"round {round_}: peers {sorted(reported)} reported, {sorted(losses)} trained"
    for peer, loss in losses.items():
        assert reported[peer] == pytest.approx(loss, rel=same), f"round {round_}, peer {peer}: loss {reported[peer]} != {loss}"
    assert all(v["loss"] is None for v in record["peers"].values() if not v["present"]), f"round {round_}: an absent peer's loss"
    assert record["loss"] == pytest.approx(sum(losses.values()) / len(losses), rel=same), f"round {round_}: mean loss"
    assert record["eval_loss"] == (None if eval_loss is None else pytest.approx(eval_loss, rel=same)), \
        f"round {round_}: held-out loss"


def check_round(network, expected, lr, rule, round_, dtype, history, observed=None):
    """Every receiver's aggregate and every replica's weights against the reference's
    (`history`: AdamW's largest bound so far, per tensor, kept across rounds)."""
    round_off, weight_eps = ROUND_OFF[dtype], torch.finfo(dtype).eps
    bounds = {name: round_off * expected.scale[name] for name in expected.update}
    for aggregate in network.aggregates:
        for name, full in expected.update.items():
            got = aggregate.updates[name].double()
            want, checked = _prefix(name, full, got.shape), _prefix(name, _checked(expected, name, full), got.shape)
            error = ((got - want).abs() * checked).max().item()
            if observed is not None and expected.scale[name] > 0:
                observed.append(error / expected.scale[name])
            assert error <= bounds[name] + 1e-300, \
                f"round {round_}, {name}: aggregate off by {error:.3g} (bound {bounds[name]:.3g})"
            clear = checked & (want.abs() > bounds[name])
            assert torch.equal(got.sign()[clear], want.sign()[clear]), f"round {round_}, {name}: a sign differs"
    for replica in network.receivers():
        for name, param in replica.items():
            shape = param.shape
            want, update = _prefix(name, expected.weights[name], shape), _prefix(name, expected.update[name], shape)
            checked = _prefix(name, _checked(expected, name, expected.update[name]), shape)
            # The weights' own round-off (a step in the run's dtype), then what each rule carries over.
            exact = 2 * weight_eps * (want.abs() + lr) + 1e-300
            slack = torch.full_like(want, float("inf"))
            if rule is ApplyRule.SIGN:
                slack[checked] = (2 * lr * (1 + 1e-9) + exact)[checked]
                clear = checked & (update.abs() > bounds[name])
                slack[clear] = exact[clear]
            elif rule is ApplyRule.SGD:
                slack[checked] = (lr * bounds[name] + exact)[checked]
            else:
                # AdamW: m_hat and sqrt(v_hat) are weighted means (and a weighted RMS) of the aggregates
                # so far, so each is off by at most the largest bound D of those rounds; the step
                # lr m_hat / (sqrt(v_hat) + eps) then by lr D (1 / den + |m_hat| / den^2).
                history[name] = max(history.get(name, 0.0), bounds[name])
                m_hat, den = (_prefix(name, x, shape) for x in expected.adam[name])
                slack[checked] = (lr * history[name] * (1 / den + m_hat.abs() / den ** 2) + exact)[checked]
            off = (param.detach().double() - want).abs() - slack
            assert off.max().item() <= 0, f"round {round_}, {name}: a replica is {off.max().item():.3g} past the reference"


def _adopt_moments(network, expected, moments):
    """AdamW's moments carry each aggregate on: where this round's was unchecked (a choice
    round-off could make either way), the reference carries on from the simulator's."""
    if expected.checked is None:
        return
    for name, (m, v, t) in moments.items():
        unchecked = ~expected.checked[name]
        if bool(unchecked.any()):
            theirs_m, theirs_v, _ = network.adam[name]
            moments[name] = (torch.where(unchecked, theirs_m.double(), m), torch.where(unchecked, theirs_v.double(), v), t)


def _prefix(name, tensor, shape):
    """What a replica of `shape` holds of a full-shape tensor: its prefix along the FFN axis."""
    axis = ffn_axis(name)
    return tensor if axis is None or tensor.shape == shape else tensor.narrow(axis, 0, shape[axis])


def _checked(expected, name, like):
    return torch.ones_like(like, dtype=torch.bool) if expected.checked is None else expected.checked[name]


def lossless_reference(case):
    cfg = case["config"]

    def reference(network, before, peers, lr, moments):
        return lossless_round(cfg.model, cfg.distro.compression_chunk, before, peers, lr, case["semantics"].value,
                              case["rule"].value, case["weight_decay"], cfg.distro.zero_blocks, moments)
    return reference


def compressed_reference(case):
    distro = case["config"].distro
    demo = DeMo(distro.compression_chunk, distro.compression_topk, distro.compression_decay, distro.quantize_1bit,
                distro.zero_blocks, ROUND_OFF[DTYPES[case["dtype"]]])

    def reference(network, before, peers, lr, moments):
        expected = demo.round(case["config"].model, before, peers, lr, case["semantics"].value, case["rule"].value,
                              case["weight_decay"], moments)
        for peer, key in demo.tied:   # an undecided choice may go either way: carry on from the simulator's
            demo.adopt(peer, key, network.peers[peer].state.delta[key])
        return expected
    return reference


def pinned(config, tiers, faults=(), **changes):
    """A case as the strategy draws it, with these fields."""
    case = dict(config=config, tiers=tiers, fractions=[0.0] * len(tiers), plan=FaultPlan(tuple(faults)),
                semantics=MeanSemantics.COEFF_MEAN, shared=False, rule=ApplyRule.SIGN, weight_decay=0.0, rounds=4,
                seed=3, batching="auto", dtype="float64")
    return {**case, **changes}


LOSSLESS_TINY = TINY.replace(distro=DistroConfig(compression_chunk=16, compression_topk=256, quantize_1bit=False,
                                                 clip_grad_norm=0.5))
# Pinned, so that what a draw meets only sometimes is met on every run: a peer that leaves in
# round 0 and comes back, with the current weights, in round 3; Psyche's cold-start warmup over
# 2 rounds, its batch ramp (4, 6, then 8 sequences), clipping.
PINNED = pinned(LOSSLESS_TINY.replace(cold_start_warmup_steps=2, global_batch_size_end=8,
                                      global_batch_size_warmup_tokens=160),
                [0, 1, 0], [Fault(0, 1, "churn", away=3, rejoin_from="current")], rule=ApplyRule.SGD)
# AdamW's moments through a join from a sliced checkpoint: peer 1 leaves in round 0 and rejoins
# in round 1 from the checkpoint sliced to tier 1 (a narrow replica, with the network's moments).
ADAMW_SLICED_JOIN = pinned(LOSSLESS_TINY, [0, 1, 0], [Fault(0, 1, "churn", away=1, rejoin_from="sliced-checkpoint",
                                                            rejoin_tier=1)], rule=ApplyRule.ADAMW, seed=0)
# Peers of two shapes and one batch size trained one by one (batching off): what "auto"
# batches on tiny, each peer alone.
SERIAL_MIXED = pinned(LOSSLESS_TINY, [0, 1, 0, 1], rounds=2, batching="off", rule=ApplyRule.SGD,
                      semantics=MeanSemantics.REGION_MEAN)
# The nightly profile's false alarm (bound taken from the largest element): one tier-0 peer, a
# Linear schedule whose rate is 0 from step 1, so from round 1 on the aggregate is the round-off
# of a residual's DCT.
RATE_DOWN_TO_ZERO = pinned(TINY.replace(lr_schedule=LinearSchedule(base_lr=0.01, warmup_steps=0, warmup_init_lr=0.0,
                                                                   total_steps=1, final_lr=0.0),
                                        distro=DistroConfig(compression_chunk=16, compression_topk=8,
                                                            compression_decay=0.9, quantize_1bit=False)),
                           [0], rounds=3, seed=0)


@pytest.mark.slow
@scaled(0.1)
@example(case=PINNED)
@example(case=ADAMW_SLICED_JOIN)
@example(case=SERIAL_MIXED)
@given(reference_runs(lossless=True))
def test_every_round_of_a_lossless_run_equals_the_exact_reference(case):
    """Catches any wrong arithmetic between a peer's gradient and the replicas' weights: padding
    on the wrong axis or at the wrong end, a mean over the wrong count, a peer's payload zeroed,
    dropped or counted twice, a sign flipped, a parameter never updated, helpers misplaced,
    AdamW moments a joining replica does not share, a sequence dealt twice."""
    play(case, lossless_reference(case))


@pytest.mark.slow
@scaled(0.1)
@example(case=RATE_DOWN_TO_ZERO)
@given(reference_runs(lossless=False))
def test_every_compressed_round_equals_an_independent_demo_step(case):
    """Compressed DisTrO (top-k of a few coefficients per block, 1-bit or not, error feedback
    over rounds, helper slabs as tensors of their own) against DeMo's step written out
    independently, mixed tiers aligned in the block domain. Catches what lossless mode cannot:
    top-k choosing the wrong coefficients, error feedback dropped or reset, decay misapplied,
    a wrong DCT, a helper residual carried over a rotation."""
    play(case, compressed_reference(case))
