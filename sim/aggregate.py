"""Aggregation of peers' payloads into one update per parameter, per receiver.

Three mean semantics (DESIGN.md):
- COEFF_MEAN: each DCT coefficient is the mean over the peers that sent it, then
  one decode. Mixed tiers are aligned in the block domain first: a narrower
  tensor's blocks are the leading blocks of the wider one when block sizes agree.
- PEER_MEAN: Psyche's heterogeneous path: decode each payload, align, sum,
  divide by the number of contributing peers.
- REGION_MEAN: HeteroFL's: like PEER_MEAN, but every element is divided by the
  number of contributors whose width covers it.

Helper slabs (helper mode) are decoded densely and placed at their neurons with
`align_sparse_grad`; they join each element's mean as extra contributors:
REGION_MEAN counts them in the element's coverage, PEER_MEAN adds them to the
sum over contributing peers, and COEFF_MEAN merges them with the coefficient
mean U of the C payloads that sent the element's DCT block: (C*U + sum) / (C + h).
Without helpers every semantics is exactly as above.

A payload that fails to decode or align is rejected as a whole: counted by
reason and logged, never silently skipped, never raised into the round.
"""
import enum
import functools
import itertools
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sim.align import align_prefix_grad, align_sparse_grad, alignable, prefix_dim
from sim.config import DistroConfig, ModelConfig
from sim.distro import ChunkGrid, Sparse, batch_decompress, decompress
from sim.errors import AlignmentError, ChunkGridMismatch, ShapeMismatch, SimError, UnsupportedParameter
from sim.model import mlp_layer
from sim.wire import HashOnce, Pairs, Payload, Rejection, decode_payload, pair_counts

log = logging.getLogger(__name__)


class MeanSemantics(enum.Enum):
    COEFF_MEAN = "coeff_mean"
    PEER_MEAN = "peer_mean"
    REGION_MEAN = "region_mean"


def mean_semantics(flag: str) -> MeanSemantics:
    """The semantics a config or flag names ("coeff", "peer", "region": sim.config.MEAN_SEMANTICS)."""
    return MeanSemantics(f"{flag}_mean")


@dataclass
class Aggregate:
    """What one receiver computed from one round's payloads."""
    updates: dict[str, torch.Tensor]          # receiver's shapes; zero where no contributor reached
    contributing_peers: int
    rejected: Counter = field(default_factory=Counter)   # reason -> payloads
    dilution: tuple[float, ...] = ()          # per layer: tier-0 contributors / all (PEER_MEAN's suffix factor)


Receiver = tuple[tuple[str, ChunkGrid], ...]             # (name, chunk grid) of every parameter it holds
BlockGroup = tuple[tuple[ChunkGrid, tuple[str, ...]], ...]  # grids of one block size, with their parameters


@functools.lru_cache(maxsize=64)
def _receiver(shapes: tuple[tuple[str, tuple[int, ...]], ...], chunk: int) -> Receiver:
    return HashOnce((name, ChunkGrid.of(shape, chunk)) for name, shape in shapes)


@functools.lru_cache(maxsize=64)
def _block_groups(receiver: Receiver) -> tuple[BlockGroup, ...]:
    """The receiver's parameters grouped by chunk grid, and the grids by block size. Every
    block of one size, whatever tensor it tiles, is averaged and decoded in one product;
    each grid's tensors are then cut from the blocks as one stack. On a small model, the
    same numbers at a fraction of the per-tensor calls."""
    by_grid: dict[ChunkGrid, list[str]] = {}
    for name, grid in receiver:
        by_grid.setdefault(grid, []).append(name)
    by_block: dict[tuple[int, ...], list] = {}
    for grid, names in by_grid.items():
        by_block.setdefault(grid.block, []).append((grid, tuple(names)))
    return tuple(tuple(group) for group in by_block.values())


@dataclass(frozen=True, eq=False)
class _SenderMap:
    """Where one sender's pairs land on a receiver's blocks."""
    size: int                             # pairs in the sender's `Pairs`
    positions: tuple[torch.Tensor, ...]   # per block group: [blocks, k] positions in them; -1: absent


@functools.lru_cache(maxsize=256)
def _sender_map(signature: tuple, receiver: Receiver) -> _SenderMap:
    """Align a sender (its `Pairs.signature`) to the receiver's chunk grids, raising if it cannot
    be. Blocks past the sender's width are absent; blocks past the receiver's width are
    dropped; blocks of different sizes cannot be mixed. Cached: a sender's shapes are the
    same every round, so alignment is worked out once and each round is a gather."""
    starts, entries = [0, *itertools.accumulate(pair_counts(signature))], {}
    for (name, grid, k), start, end in zip(signature, starts, starts[1:]):
        entries[name] = grid, k, torch.arange(start, end).view(*grid.blocks, k)
    positions = []
    for group in _block_groups(receiver):
        names = [name for _, names in group for name in names]
        if name := next((n for n in names if n not in entries), None):
            raise KeyError(f"parameter {name} is missing")
        if len({entries[name][1] for name in names}) > 1:
            raise ShapeMismatch(f"{names[0]}: k differs between parameters of one block size "
                                f"{[entries[name][1] for name in names]}")
        k = entries[names[0]][1]
        positions.append(torch.cat([_aligned_blocks(name, *entries[name][::2], grid).reshape(-1, k)
                                    for grid, names in group for name in names]))
    return _SenderMap(starts[-1], tuple(positions))


def _aligned_blocks(name: str, sent: ChunkGrid, positions: torch.Tensor, grid: ChunkGrid) -> torch.Tensor:
    """A sender's per-block `positions` [*sent.blocks, k] moved onto the receiver's `grid`."""
    if sent == grid:
        return positions
    dim = prefix_dim(name)
    if sent.block != grid.block:
        raise ChunkGridMismatch(f"{name}: sender blocks {sent.block} of {list(sent.shape)} do not "
                                f"line up with receiver blocks {grid.block} of {list(grid.shape)}")
    alignable(name, sent.shape, grid.shape)  # checks the other axes
    have, want = sent.blocks[dim], grid.blocks[dim]
    if have >= want:
        return positions.narrow(dim, 0, want)
    pad = list(positions.shape)
    pad[dim] = want - have
    return torch.cat([positions, positions.new_full(pad, -1)], dim=dim)


@functools.lru_cache(maxsize=4)  # a round needs one per receiver shape; each holds every payload's positions
def _block_map(receiver: Receiver, senders: tuple[_SenderMap, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Per block group, [blocks, sum of k] positions into the senders' pairs laid end to end
    and followed by one absent pair per group; and those absent pairs' indices."""
    starts = [0, *itertools.accumulate(s.size for s in senders)]
    total, groups = starts[-1], _block_groups(receiver)
    positions = tuple(torch.cat([torch.where(s.positions[g] >= 0, s.positions[g] + start, total + g)
                                 for s, start in zip(senders, starts)], dim=-1) for g in range(len(groups)))
    return positions, torch.tensor([group[0][0].block_numel for group in groups])


def _gathered_pairs(receiver: Receiver, pairs: Sequence[Pairs]):
    """Per block group: (group, indices, values), every payload's pairs aligned to the
    receiver's blocks, [blocks, sum of k], the blocks in `_block_groups` order."""
    maps, absent = _block_map(receiver, tuple(_sender_map(p.signature, receiver) for p in pairs))
    indices = torch.cat([*(p.indices for p in pairs), absent])
    values = torch.cat([*(p.values for p in pairs), pairs[0].values.new_zeros(absent.numel())])
    for group, positions in zip(_block_groups(receiver), maps):
        yield group, indices.take(positions), values.take(positions)


def _cut(group: BlockGroup, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor of a block group from its decoded blocks [blocks, *block]."""
    tensors, start = {}, 0
    for grid, names in group:
        count = len(names) * math.prod(grid.blocks)
        stack = grid.assemble(blocks[start:start + count].view(len(names), *grid.blocks, *grid.block))
        tensors.update(zip(names, stack.unbind(0)))
        start += count
    return tensors


def homogeneous_update(payloads: Sequence[Payload]) -> dict[str, torch.Tensor]:
    """Psyche's homogeneous fast path: batch_decompress per parameter (one shape for all)."""
    return {name: batch_decompress([p.params[name] for p in payloads]) for name in payloads[0].params}


def _coverage(name: str, sent: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """1 on the elements a sender of shape `sent` covers in the receiver's shape, else 0."""
    ones = torch.ones(sent)
    return ones if sent == tuple(shape) else align_prefix_grad(name, ones, shape)


def _coverage_count(name: str, payloads: Sequence[Payload], shape) -> torch.Tensor:
    """How many payloads' widths cover each element of the receiver's `shape`."""
    senders = Counter(p.params[name].grid.shape for p in payloads)
    return sum((count * _coverage(name, sent, shape) for sent, count in senders.items()), torch.zeros(shape))


def _sending_count(name: str, payloads: Sequence[Payload], shape) -> torch.Tensor:
    """How many payloads sent something for the DCT block of each element of `shape`: the C
    that COEFF_MEAN's coefficient mean U is a mean over. A sender whose block went out
    all-absent (an all-zero block) covers the element by its width but not U."""
    count = torch.zeros(shape)
    for payload in payloads:
        sparse = payload.params[name]
        grid = sparse.grid
        sent = (sparse.indices != grid.block_numel).any(-1).to(count.dtype)   # [*blocks]
        for dim, size in enumerate(grid.block):
            sent = sent.repeat_interleave(size, dim)
        count += sent if grid.shape == tuple(shape) else align_prefix_grad(name, sent, shape)
    return count


def _helper_sums(payloads: Sequence[Payload], receiver_shapes: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per MLP tensor some helper reached: the sum of the helper slabs placed at their neurons
    in the receiver's shape, and how many slabs cover each element. Neurons past a (sliced)
    receiver's width are not its to hold and are dropped."""
    sums = {}
    for payload in payloads:
        for name, sparse in payload.helper_params.items():
            shape, dim = receiver_shapes[name], prefix_dim(name)
            neurons, dense = payload.helper_neurons[mlp_layer(name)].long(), decompress(sparse)
            keep = neurons < shape[dim]
            if not bool(keep.all()):
                neurons, dense = neurons[keep], dense.index_select(dim, keep.nonzero().view(-1))
            total, count = sums.setdefault(name, (dense.new_zeros(shape), torch.zeros(shape)))
            total += align_sparse_grad(name, dense, neurons, shape)
            count += align_sparse_grad(name, torch.ones_like(dense), neurons, shape)
    return sums


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count where something contributed, zero elsewhere."""
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def _dense_sum(name: str, payloads: Sequence[Payload], shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the payloads' decoded updates aligned to `shape`, and how many cover each element.

    Payloads of one sender shape are summed in coefficient space and decoded once
    (decode is linear): the same sum as decoding each, at one decode per shape."""
    groups: dict[ChunkGrid, list[Sparse]] = {}
    for payload in payloads:
        sparse = payload.params[name]
        groups.setdefault(sparse.grid, []).append(sparse)
    total = payloads[0].params[name].values.new_zeros(shape)
    for grid, members in groups.items():
        indices = torch.cat([m.indices for m in members], dim=-1)
        values = torch.cat([m.values for m in members], dim=-1)
        dense = grid.decode_pairs(indices, values, reduce="sum")
        if grid.shape != tuple(shape):
            dense = align_prefix_grad(name, dense, shape)
        total += dense
    return total, _coverage_count(name, payloads, shape)


def _check(payload: Payload, receiver: Receiver, semantics: MeanSemantics) -> Pairs | None:
    """Raise if a payload cannot align to the receiver: its blocks (COEFF_MEAN, which then
    gathers from the payload's pairs, returned) or its shapes (the dense semantics, whose
    sums are formed per sender shape afterwards), and its helper slabs."""
    grids, pairs = dict(receiver), None
    if semantics is MeanSemantics.COEFF_MEAN:
        pairs = payload.pairs()
        _sender_map(pairs.signature, receiver)
    else:
        for name, grid in grids.items():
            if payload.params[name].grid.shape != grid.shape:
                alignable(name, payload.params[name].grid.shape, grid.shape)
    for name, slab in payload.helper_params.items():
        dim, shape = prefix_dim(name), list(grids[name].shape)
        neurons = payload.helper_neurons[mlp_layer(name)]
        if neurons.numel() and (int(neurons.min()) < payload.params[name].grid.shape[dim]
                                or not bool((neurons[1:] > neurons[:-1]).all())):
            raise AlignmentError(f"{name}: helper neurons must be sorted, unique and past the sender's own width")
        shape[dim] = neurons.numel()
        if tuple(shape) != slab.grid.shape:
            raise ShapeMismatch(f"{name}: helper slab {list(slab.grid.shape)} does not fit {shape[dim]} neurons "
                                f"of the receiver's {list(grids[name].shape)}")
    return pairs


def aggregate(payloads: Sequence[Payload], receiver_shapes: dict[str, tuple[int, ...]], distro: DistroConfig,
              semantics: MeanSemantics = MeanSemantics.COEFF_MEAN, rejected: Counter | None = None) -> Aggregate:
    """Combine decoded payloads into the receiver's shapes under `semantics`."""
    rejected = Counter() if rejected is None else rejected
    receiver = _receiver(tuple((name, tuple(shape)) for name, shape in receiver_shapes.items()), distro.compression_chunk)
    accepted, pairs = [], []
    for payload in payloads:
        try:
            pairs.append(_check(payload, receiver, semantics))
            accepted.append(payload)
        except ChunkGridMismatch as err:
            _reject(rejected, payload.peer, Rejection("chunk_grid_mismatch", str(err)))
        except (ShapeMismatch, UnsupportedParameter, AlignmentError, KeyError) as err:
            _reject(rejected, payload.peer, Rejection("bad_shape", f"{type(err).__name__}: {err}"))

    n = len(accepted)
    if n == 0:
        return Aggregate({name: torch.zeros(shape) for name, shape in receiver_shapes.items()}, 0, rejected)
    helpers = _helper_sums(accepted, receiver_shapes)
    if semantics is MeanSemantics.COEFF_MEAN:
        updates = _coefficient_means(receiver, pairs)
        for name, (extra, extra_count) in helpers.items():
            sending = _sending_count(name, accepted, receiver_shapes[name])
            updates[name] = _mean(sending * updates[name] + extra, sending + extra_count)
        return Aggregate(updates, n, rejected, _dilution(accepted))
    updates = {}
    for name, shape in receiver_shapes.items():
        total, covered = _dense_sum(name, accepted, shape)
        extra, extra_count = helpers.get(name, (0.0, 0.0))
        if semantics is MeanSemantics.PEER_MEAN:
            updates[name] = (total + extra) / n
        else:
            updates[name] = _mean(total + extra, covered + extra_count)
    return Aggregate(updates, n, rejected, _dilution(accepted))


def _coefficient_means(receiver: Receiver, pairs: Sequence[Pairs]) -> dict[str, torch.Tensor]:
    """COEFF_MEAN of every parameter from the accepted payloads' pairs: each block group's
    gathered pairs averaged and decoded at once."""
    updates = {}
    for group, indices, values in _gathered_pairs(receiver, pairs):
        updates.update(_cut(group, group[0][0].decode_block_pairs(indices, values)))
    return {name: updates[name] for name, _ in receiver}


def _dilution(accepted: Sequence[Payload]) -> tuple[float, ...]:
    if not accepted:
        return ()
    layers = len(accepted[0].tiers)
    return tuple(sum(p.tiers[layer] == 0 for p in accepted) / len(accepted) for layer in range(layers))


def _reject(rejected: Counter, peer, rejection: Rejection) -> None:
    # INFO, not WARNING: every receiver logs its own rejections, and the counts already
    # go to the metrics; `--log-level info` shows them.
    rejected[rejection.reason] += 1
    log.info("rejected payload from peer %s: %s (%s)", peer, rejection.reason, rejection.detail)


def receive(raw: Sequence[bytes], model: ModelConfig, distro: DistroConfig,
            receiver_shapes: dict[str, tuple[int, ...]],
            semantics: MeanSemantics = MeanSemantics.COEFF_MEAN, round_: int | None = None) -> Aggregate:
    """Decode, validate and aggregate one round's payloads as a receiver does. With
    `round_`, payloads of another round are stale and a peer's second payload a duplicate."""
    return receive_decoded([decode_payload(data, model, distro) for data in raw], receiver_shapes, distro,
                           semantics, round_)


def receive_decoded(decoded: Sequence[Payload | Rejection], receiver_shapes: dict[str, tuple[int, ...]],
                    distro: DistroConfig, semantics: MeanSemantics = MeanSemantics.COEFF_MEAN,
                    round_: int | None = None) -> Aggregate:
    """`receive` after decoding: decoding is a pure function of the bytes, so a simulator
    may decode each arriving payload once and hand the results to every receiver."""
    rejected, accepted, seen = Counter(), [], set()
    for result in decoded:
        peer = "?"  # a payload too broken to name its sender
        if isinstance(result, Payload):
            peer = result.peer
            if round_ is not None and result.round != round_:
                result = Rejection("stale_round", f"payload of round {result.round} arrived in round {round_}")
            elif result.peer in seen:
                result = Rejection("duplicate", f"peer {result.peer} already contributed to round {result.round}")
        if isinstance(result, Rejection):
            _reject(rejected, peer, result)
        else:
            seen.add(result.peer)
            accepted.append(result)
    return aggregate(accepted, receiver_shapes, distro, semantics, rejected)


class ApplyRule(enum.Enum):
    SIGN = "sign"      # DisTrO: param -= lr * sign(update)
    SGD = "sgd"        # param -= lr * update (shows PEER_MEAN's dilution, which sign hides)
    ADAMW = "adamw"    # AdamW with the update as its gradient


def apply_update(params: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]], updates: dict[str, torch.Tensor],
                 lr: float, rule: ApplyRule = ApplyRule.SIGN, weight_decay: float = 0.0, adam_state: dict | None = None,
                 betas=(0.9, 0.95), eps: float = 1e-8) -> None:
    """Apply a receiver's aggregate in place, to one replica's parameters or to several
    replicas of the same shapes at once (the step, a sign say, is then computed once).
    Decoupled weight decay: param *= 1 - lr * wd.

    ADAMW: the moments (`adam_state`, {name: (m, v, t)}) are a function of the history of
    aggregates, which every receiver computes alike for every element it holds: one state
    serves every replica. It steps once per call, in the shape of `updates` (give the widest
    receiver's), and each replica applies the step narrowed to its own shapes (a replica from a
    sliced checkpoint, joining late, steps with the network's moments, as if they had come
    with its weights)."""
    replicas = [params] if isinstance(params, dict) else list(params)
    if rule is not ApplyRule.ADAMW:
        _apply_elementwise(replicas, updates, lr, rule, weight_decay)
        return
    if adam_state is None:
        raise SimError("ApplyRule.ADAMW needs an adam_state dict that persists across rounds")
    if not replicas:
        return
    dtype = next(iter(replicas[0].values())).dtype   # an empty round's aggregate is float32 zeros
    with torch.no_grad():
        for name, update in updates.items():
            update = update.to(dtype)
            m, v, t = adam_state.get(name, (torch.zeros_like(update), torch.zeros_like(update), 0))
            if m.shape != update.shape:   # a wider receiver than before: elements new to the moments start at 0
                m, v = (align_prefix_grad(name, x, update.shape) for x in (m, v))
            t += 1
            m.mul_(betas[0]).add_(update, alpha=1 - betas[0])
            v.mul_(betas[1]).addcmul_(update, update, value=1 - betas[1])
            step = lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
            adam_state[name] = (m, v, t)
            for param in (replica[name] for replica in replicas if name in replica):
                own = step if step.shape == param.shape else align_prefix_grad(name, step, param.shape)
                if weight_decay:
                    param.mul_(1 - lr * weight_decay)
                param.sub_(own.to(device=param.device, dtype=param.dtype))


def _apply_elementwise(replicas: Sequence[dict[str, torch.Tensor]], updates: dict[str, torch.Tensor], lr: float,
                       rule: ApplyRule, weight_decay: float) -> None:
    """SIGN and SGD over every parameter of every replica at once (torch's _foreach kernels, as
    its optimizers use): the same arithmetic as one tensor at a time, without a Python loop's
    per-tensor calls."""
    if not replicas:
        return
    first = replicas[0]
    steps = [updates[name].to(device=p.device, dtype=p.dtype) for name, p in first.items()]
    if rule is ApplyRule.SIGN:
        steps = torch._foreach_sign(steps)
    targets = [p for replica in replicas for p in (replica[name] for name in first)]
    with torch.no_grad():
        if weight_decay:
            torch._foreach_mul_(targets, 1 - lr * weight_decay)
        torch._foreach_add_(targets, steps * len(replicas), alpha=-lr)
