"""The exact reference round: an independent, deliberately naive implementation of one
heterogeneous round, to check the simulator against after every round.

It shares no code with sim/aggregate.py, sim/distro.py or sim/wire.py, nor with the
model's tier slicing: every peer's tier-t model is its own narrow copy of the weights
(prefix neurons, plus its helper neurons), run through a forward written out here;
gradients are placed back into full-size zero tensors and combined element by element.
Only the inputs come from the simulator's spec functions: the data source and the tokens
of a data index (sim/data.py), the round's random seed (sim/assignment.py), the helper
neurons a peer trains (sim/helper.py). Which sequences each peer trains (Psyche's
assignment), the learning rate, the held-out batch and the losses a round's record
reports are worked out here too.

Two references:
- `lossless_round`: DisTrO with top-k equal to the block size and no 1-bit, so a peer's
  whole delta, lr * grad, is transmitted and nothing is left behind. Each element of the
  update is combined over the peers that cover it:
    COEFF_MEAN: the mean over the covering peers, but a peer whose DCT block (in its own
      local tensor) is entirely zero sends nothing for that block and does not count;
    REGION_MEAN: the mean over the covering peers;
    PEER_MEAN: the sum over covering peers divided by all contributing peers;
  helper neurons are extra coverage under every semantics. Then the apply rule.
- `sim.reference_demo.DeMo`: DeMo's compressed step written out, with its own DCT, top-k,
  1-bit signs, scatter-mean and per-peer error feedback, combined by this module's rules.

`learning_rate` is Psyche's four schedules written out (shared/core/src/definitions.rs)
with `step` the round, quirks included (Cosine is not clamped past total_steps), times
the cold-start factor; `global_batch` Psyche's batch ramp (get_batch_size at each
round's data index) and the data index itself; `split` Psyche's assign_data_for_state.
`held_out` is the batch every evaluation reads; `peer_loss` what a peer reports.

`round_inputs` replays a fault plan naively: who is present (churn), at which tiers,
whose payload counts (drop, late, corrupt and NaN lose it; a duplicate counts once; a
byzantine payload counts, sign-flipped or scaled by 10) and whose DisTrO state steps.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sim.config import ModelConfig, RunConfig
from sim.assignment import round_seed
from sim.data import held_out as data_held_out
from sim.data import make_source, sequences
from sim.faults import FaultPlan
from sim.helper import helper_indices

SEMANTICS = ("coeff_mean", "peer_mean", "region_mean")
RULES = ("sign", "sgd", "adamw")
# (module, kind) -> the axis that holds FFN neurons; every other parameter is whole on every tier.
FFN_AXIS = {("gate_proj", "weight"): 0, ("up_proj", "weight"): 0, ("gate_proj", "bias"): 0,
            ("up_proj", "bias"): 0, ("down_proj", "weight"): 1}
LOSING = {"drop", "late", "corrupt", "nan"}   # faults whose payload does not count that round
HELD_OUT_SEQUENCES = 16   # at least, and at least a global batch


def ffn_axis(name: str) -> int | None:
    parts = name.split(".")
    return FFN_AXIS.get((parts[-2], parts[-1])) if len(parts) >= 3 and parts[-3] == "mlp" else None


def layer_of(name: str) -> int:
    return int(name.split(".")[2])


def chunk_of(n: int, chunk: int) -> int:
    """The DCT block size along an axis of n: the largest divisor of n not above chunk."""
    return next(d for d in range(min(n, chunk), 0, -1) if n % d == 0)


# --- the model, written out -----------------------------------------------------

def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(cfg: ModelConfig, T: int, dtype):
    # Angles in float32, as HF computes them; the model's RoPE is then exact in any dtype.
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _linear(x, w, b=None):
    return x @ w.T + (0 if b is None else b)


def loss_of(cfg: ModelConfig, w: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of the causal LM whose weights are `w` (any FFN widths:
    a layer runs on as many neurons as its tensors hold) on tokens [B, T + 1]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    B, T = inputs.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = w["model.embed_tokens.weight"][inputs]
    cos, sin = _rope(cfg, T, x.dtype)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = _linear(h, w[p + "self_attn.q_proj.weight"]).view(B, T, nh, hd).transpose(1, 2)
        k = _linear(h, w[p + "self_attn.k_proj.weight"]).view(B, T, nkv, hd).transpose(1, 2)
        v = _linear(h, w[p + "self_attn.v_proj.weight"]).view(B, T, nkv, hd).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + _linear(attention.transpose(1, 2).reshape(B, T, nh * hd), w[p + "self_attn.o_proj.weight"])
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        up = _linear(h, w[p + "mlp.up_proj.weight"], w.get(p + "mlp.up_proj.bias"))
        if cfg.style == "llama":
            hidden = F.silu(_linear(h, w[p + "mlp.gate_proj.weight"], w.get(p + "mlp.gate_proj.bias"))) * up
        else:
            hidden = F.relu(up) ** 2
        x = x + _linear(hidden, w[p + "mlp.down_proj.weight"], w.get(p + "mlp.down_proj.bias"))
    x = _rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return F.cross_entropy((x @ head.T).reshape(B * T, -1), targets.reshape(-1))


# --- one peer ---------------------------------------------------------------------

@dataclass
class PeerInput:
    """What one present peer does in a round."""
    id: int
    tiers: tuple[int, ...]                     # per layer
    tokens: torch.Tensor                       # [B, T + 1]
    helpers: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> suffix neurons it also trains
    factor: float | None = 1.0                 # its payload's weight: None when it does not count this round
    steps: bool = True                         # its DisTrO state advances (not when its NaN guard withholds)
    fresh: bool = False                        # it (re)joined this round: a fresh DisTrO state
    clip: float | None = None                  # Distro's clip_grad_norm: its whole gradient's norm at most this
    micro: int | None = None                   # --micro-batch-size: its batch in pieces of at most this


@dataclass
class Gradient:
    """One peer's gradient of one parameter, placed in the full shape."""
    prefix: torch.Tensor        # its own neurons' gradient (the whole tensor for non-FFN parameters), zero elsewhere
    covered: torch.Tensor       # 1 where `prefix` covers, else 0
    helper: torch.Tensor        # its helper neurons' gradient, zero elsewhere
    helper_covered: torch.Tensor
    local: torch.Tensor         # what it trains of the tensor in its own (local) shape: its prefix
    slab: torch.Tensor | None = None   # its helper neurons' gradient in the slab's own shape, in their order


def narrow_copy(cfg: ModelConfig, weights: dict[str, torch.Tensor], peer: PeerInput) -> tuple[dict, dict]:
    """The peer's own model: copies of its prefix neurons and helper neurons of every FFN
    tensor (and of every other tensor whole), leaves of their own autograd graph; with,
    per FFN tensor, (its prefix width, the full-width indices of the neurons it holds)."""
    active, narrow = {}, {}
    for name, w in weights.items():
        axis = ffn_axis(name)
        if axis is None:
            narrow[name] = w.detach().clone().requires_grad_()
            continue
        layer = layer_of(name)
        width = cfg.intermediate_size >> peer.tiers[layer]
        helpers = peer.helpers.get(layer, torch.zeros(0, dtype=torch.long))
        active[name] = (width, torch.cat([torch.arange(width), helpers.long()]))
        narrow[name] = w.detach().index_select(axis, active[name][1]).clone().requires_grad_()
    return narrow, active


def pieces(tokens: torch.Tensor, micro: int | None) -> list[torch.Tensor]:
    """Psyche's micro-batches, written out: n = ceil(B / micro) of them, each of ceil(B / n)
    sequences but the last (torch's chunk into n pieces)."""
    batch = tokens.shape[0]
    if micro is None or micro >= batch:
        return [tokens]
    count = -(-batch // micro)
    size = -(-batch // count)
    return [tokens[start:start + size] for start in range(0, batch, size)]


def batch_loss(cfg: ModelConfig, w: dict[str, torch.Tensor], peer: "PeerInput") -> torch.Tensor:
    """The loss a peer trains on: each micro-batch's loss over the number of micro-batches, summed."""
    split = pieces(peer.tokens, peer.micro)
    return sum(loss_of(cfg, w, piece) / len(split) for piece in split)


def peer_loss(cfg: ModelConfig, weights: dict[str, torch.Tensor], peer: PeerInput) -> float:
    """The training loss the peer reports: its own model's, on its tokens, before the round's update."""
    with torch.no_grad():
        return float(batch_loss(cfg, narrow_copy(cfg, weights, peer)[0], peer))


def peer_gradients(cfg: ModelConfig, weights: dict[str, torch.Tensor], peer: PeerInput) -> dict[str, Gradient]:
    """Train the peer's own narrow copy of `weights` (full shapes) on its tokens."""
    narrow, active = narrow_copy(cfg, weights, peer)
    batch_loss(cfg, narrow, peer).backward()
    if peer.clip:
        norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in narrow.values()))
        scale = min(1.0, peer.clip / (norm + 1e-6))
        for p in narrow.values():
            p.grad *= scale
    grads = {}
    for name, w in weights.items():
        grad, axis = narrow[name].grad, ffn_axis(name)
        if axis is None:
            grads[name] = Gradient(grad, torch.ones_like(grad), torch.zeros_like(grad), torch.zeros_like(grad), grad)
            continue
        width, rows = active[name]
        placed = torch.zeros_like(w).index_copy_(axis, rows, grad)
        own = (torch.arange(w.shape[axis]) < width).to(w.dtype)
        mask = own.view(-1, 1) if axis == 0 and w.ndim == 2 else own
        mask = torch.ones_like(w) * mask
        helper_mask = torch.zeros_like(w).index_fill_(axis, rows[width:], 1.0)
        slab = grad.narrow(axis, width, len(rows) - width) if len(rows) > width else None
        grads[name] = Gradient(placed * mask, mask, placed * helper_mask, helper_mask, grad.narrow(axis, 0, width), slab)
    return grads


def block_elements(per_block: torch.Tensor, shape, chunk: int) -> torch.Tensor:
    """A value per DCT block of a tensor of `shape`, repeated over the block's elements."""
    for dim, n in enumerate(shape):
        per_block = per_block.repeat_interleave(chunk_of(n, chunk), dim)
    return per_block


def sent_blocks(local: torch.Tensor, covered: torch.Tensor, chunk: int, axis: int | None) -> torch.Tensor:
    """1 on the elements whose DCT block of the peer's local tensor is not entirely zero
    (in the full shape; 0 outside the local tensor)."""
    blocks = [chunk_of(n, chunk) for n in local.shape]
    if local.ndim == 1:
        nonzero = local.reshape(-1, blocks[0]).ne(0).any(-1)
    else:
        (rows, cols), (br, bc) = local.shape, blocks
        nonzero = local.reshape(rows // br, br, cols // bc, bc).ne(0).any(3).any(1)
    full = torch.zeros_like(covered)
    (full if axis is None else full.narrow(axis, 0, local.shape[axis])).copy_(block_elements(nonzero, local.shape, chunk))
    return full


# --- combining and applying --------------------------------------------------------

@dataclass
class Round:
    update: dict[str, torch.Tensor]       # the aggregate before the apply rule, full shapes
    weights: dict[str, torch.Tensor]      # after applying it
    contributing: int
    # Per tensor, the size of what went into its aggregate: the largest |element| among the
    # counted peers' inputs to their DisTrO step (lr x gradient x the payload's factor, plus in
    # compressed mode decay x the residual carried in). Round-off in any implementation is a
    # multiple of the dtype's epsilon of this, never of the aggregate, which may be exactly 0.
    scale: dict[str, float] = field(default_factory=dict)
    checked: dict[str, torch.Tensor] | None = None   # DeMo: elements no top-k tie reached (None: all)
    adam: dict[str, tuple] | None = None   # ADAMW: (m_hat, sqrt(v_hat) + eps) of the step applied


def combine(totals: dict, covers: dict, contributing: int, semantics: str) -> dict[str, torch.Tensor]:
    """Each element's mean: total over its cover (COEFF_MEAN, REGION_MEAN), or over every
    contributing peer (PEER_MEAN); zero where nothing covers it."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics {semantics!r}: expected one of {SEMANTICS}")
    if semantics == "peer_mean":
        return {n: t / max(contributing, 1) for n, t in totals.items()}
    return {n: torch.where(covers[n] > 0, t / covers[n].clamp(min=1), torch.zeros_like(t)) for n, t in totals.items()}


ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-8   # matsim's ApplyRule.ADAMW (sim.aggregate.apply_update's defaults)


def apply(weights: dict[str, torch.Tensor], update: dict[str, torch.Tensor], lr: float, rule: str,
          weight_decay: float, moments: dict | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Decoupled weight decay, then sign-SGD (DisTrO), plain SGD, or AdamW with the aggregate
    as its gradient. AdamW's `moments` ({name: (m, v, t)}, full shapes, updated in place) are
    the network's: one history of aggregates, whatever replica applies it. Returns the new
    weights and, under AdamW, each step's (m_hat, sqrt(v_hat) + eps)."""
    if rule not in RULES:
        raise ValueError(f"apply rule {rule!r}: expected one of {RULES}")
    if rule != "adamw":
        step = {n: u.sign() if rule == "sign" else u for n, u in update.items()}
        return {n: w * (1 - lr * weight_decay) - lr * step[n] for n, w in weights.items()}, None
    (b1, b2), out, steps = ADAM_BETAS, {}, {}
    for name, w in weights.items():
        u = update[name]
        m, v, t = moments.get(name, (torch.zeros_like(u), torch.zeros_like(u), 0))
        m, v, t = b1 * m + (1 - b1) * u, b2 * v + (1 - b2) * u * u, t + 1
        moments[name] = (m, v, t)
        steps[name] = (m / (1 - b1 ** t), (v / (1 - b2 ** t)).sqrt() + ADAM_EPS)
        out[name] = w * (1 - lr * weight_decay) - lr * steps[name][0] / steps[name][1]
    return out, steps


def lossless_round(cfg: ModelConfig, chunk: int, weights: dict[str, torch.Tensor], peers: Sequence[PeerInput],
                   lr: float, semantics: str, rule: str = "sign", weight_decay: float = 0.0,
                   zero_blocks: str = "absent", moments: dict | None = None) -> Round:
    """One round in lossless DisTrO mode from the full `weights` every replica holds. With
    `zero_blocks` "sent", an all-zero block's zeros count in COEFF_MEAN like any others."""
    counted = [p for p in peers if p.factor is not None]
    totals = {n: torch.zeros_like(w) for n, w in weights.items()}
    covers = {n: torch.zeros_like(w) for n, w in weights.items()}
    scale = dict.fromkeys(weights, 0.0)
    for peer in counted:
        for name, g in peer_gradients(cfg, weights, peer).items():
            delta = lr * peer.factor
            totals[name] += delta * (g.prefix + g.helper)
            scale[name] = max(scale[name], abs(delta) * float((g.prefix + g.helper).abs().max()))
            absent = semantics == "coeff_mean" and zero_blocks == "absent"
            cover = sent_blocks(g.local, g.covered, chunk, ffn_axis(name)) if absent else g.covered
            covers[name] += cover + g.helper_covered
    update = combine(totals, covers, len(counted), semantics)
    return Round(update, *applied(weights, update, lr, rule, weight_decay, moments, len(counted), scale))


def applied(weights, update, lr, rule, weight_decay, moments, contributing, scale, checked=None) -> tuple:
    """Round's fields after the update: (weights, contributing, scale, checked, adam)."""
    after, steps = apply(weights, update, lr, rule, weight_decay, moments)
    return after, contributing, scale, checked, steps


# --- the schedule and the held-out batch -------------------------------------------

def learning_rate(config: RunConfig, step: int) -> float:
    """Psyche's get_lr at `step` for each of its four schedules (definitions.rs), times the
    cold-start factor of Trainer::get_lr (the first epoch's first cold_start_warmup_steps)."""
    s = config.lr_schedule.__dict__
    base, init, warmup = s["base_lr"], s["warmup_init_lr"], s["warmup_steps"]
    kind = type(config.lr_schedule).__name__
    if step < warmup:
        rate = init + (base - init) * (step / warmup)
    elif kind == "ConstantSchedule":
        rate = base
    elif kind == "LinearSchedule":
        total, final = s["total_steps"], s["final_lr"]
        rate = base + (final - base) * ((step - warmup) / (total - warmup)) if step < total else final
    elif kind == "CosineSchedule":   # no clamp: past total_steps Psyche's cosine climbs back
        final = s["final_lr"]
        rate = final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (s["total_steps"] - warmup)))
    else:
        stable, cosine, linear = warmup + s["stable_steps"], s["cosine_decay_steps"], s["linear_decay_steps"]
        mid, low = s["cosine_decay_final_lr"], s["linear_decay_final_lr"]
        if step < stable:
            rate = base
        elif step < stable + cosine:
            rate = mid + (base - mid) * 0.5 * (1.0 + math.cos(math.pi * (step - stable) / cosine))
        elif step < stable + cosine + linear:
            rate = mid - (mid - low) * ((step - stable - cosine) / linear)
        else:
            rate = low
    cold = config.cold_start_warmup_steps
    return rate * (step / cold if cold and step <= cold else 1.0)


def global_batch(config: RunConfig, step: int) -> tuple[int, int]:
    """(first data index, sequences) of round `step`'s global batch: Psyche's
    CoordinatorConfig::get_batch_size at the tokens the rounds before consumed (a linear ramp
    over the warmup tokens, rounded), each round starting where the one before ended."""
    start, warm = config.global_batch_size, config.global_batch_size_warmup_tokens
    end = config.global_batch_size_end or start
    consumed = 0
    for round_ in range(step + 1):
        tokens = consumed * config.seq_len
        batch = end if tokens >= warm else int(start + (end - start) * (tokens / warm) + 0.5)
        if round_ < step:
            consumed += batch
    return consumed, batch


def split(present: Sequence[int], total: int, first: int, seed: int) -> dict[int, list[int]]:
    """Psyche's assign_data_for_state, written out: the present peers (in join order)
    shuffled by its LCG walk from `seed`, then `total` sequences from `first` on dealt out in
    that order, total // n each and one more to the first total % n; none to a peer with 0."""
    order, state = list(present), seed
    for i in reversed(range(1, len(order))):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2 ** 64
        j = state % (i + 1)
        order[i], order[j] = order[j], order[i]
    dealt, index = {}, first
    for position, peer in enumerate(order):
        count = total // len(order) + (position < total % len(order))
        if count:
            dealt[peer] = list(range(index, index + count))
            index += count
    return dealt


def held_out(config: RunConfig, seed: int) -> torch.Tensor:
    """The batch every evaluation of a run reads: drawn for no round and no peer (-1, -1),
    from the chain's own seed where the config gives one (one task for every run seed), and
    never a peer's training shard."""
    source = make_source(config.data, config.model.vocab_size, seed, config.markov)
    task = seed if config.markov.seed is None else config.markov.seed
    return data_held_out(source, task, max(HELD_OUT_SEQUENCES, config.global_batch_size), config.seq_len + 1)


# --- replaying a fault plan --------------------------------------------------------

def round_inputs(config: RunConfig, seed: int, tiers: Sequence, fractions: Sequence[float], plan: FaultPlan,
                 round_: int, shared: bool = False) -> list[PeerInput]:
    """The present peers of `round_` under `plan`, replayed from round 0: churned peers are
    away for their rounds and come back (at their new tier, with a fresh state; from a
    checkpoint sliced below tier 0 with no suffix, so with helper mode off from then on,
    unless every peer shares one model); the sequences each is dealt (a present peer dealt
    none trains nothing and is left out) and its helper neurons; whether and how its payload
    counts under its faults of the round (one or two)."""
    layers = config.model.num_hidden_layers
    current = [tuple(t) if isinstance(t, (tuple, list)) else (t,) * layers for t in tiers]
    fractions, away, fresh = list(fractions), set(), set()
    for r in range(round_ + 1):
        fresh = set()
        for f in plan.faults:
            if f.kind == "churn" and f.round + f.away == r:
                away.discard(f.peer)
                fresh.add(f.peer)
                if f.rejoin_tier is not None:
                    current[f.peer] = (f.rejoin_tier,) * layers
                if f.rejoin_from == "sliced-checkpoint" and min(current[f.peer]) > 0 and not shared:
                    fractions[f.peer] = 0.0
            if f.kind == "churn" and f.round == r:
                away.add(f.peer)
    source = make_source(config.data, config.model.vocab_size, seed, config.markov)
    first, total = global_batch(config, round_)
    present = [peer for peer in range(len(tiers)) if peer not in away]
    dealt = split(present, total, first, round_seed(seed, round_))
    quantized = config.distro.quantize_1bit
    peers = []
    for peer in present:
        if peer not in dealt:   # nothing to train on: it sends nothing, reports no loss
            continue
        faults = {f.kind: f for f in plan.faults if f.round == round_ and f.peer == peer and f.kind != "churn"}
        factor = None if LOSING & faults.keys() else 1.0
        if factor is not None and "byzantine" in faults:
            factor = 10.0 if not quantized and faults["byzantine"].byte % 2 == 1 else -1.0
        helpers = {}
        if fractions[peer] > 0:
            full = config.model.intermediate_size
            helpers = {layer: helper_indices(seed, round_, layer, full >> t, full, fractions[peer],
                                             config.helper_rotation_interval) for layer, t in enumerate(current[peer])}
        tokens = sequences(source, seed, dealt[peer], config.seq_len + 1)
        peers.append(PeerInput(peer, current[peer], tokens, helpers, factor,
                               steps=not ("nan" in faults and quantized), fresh=peer in fresh,
                               clip=config.distro.clip_grad_norm, micro=config.micro_batch_size))
    return peers
