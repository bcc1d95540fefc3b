"""DisTrO (DeMo-style) compression: chunked DCT, per-chunk top-k, 1-bit signs.

A parameter of shape [R, C] is cut into blocks of cr x cc (cr: the largest
divisor of R not above `chunk`, likewise cc), each block is transformed with
an orthonormal 2-D DCT-II, and the `topk` largest-magnitude coefficients of
every block are kept. 1-D tensors use 1-D blocks. A sparse tensor is then
(indices, values) of shape [*blocks, k], indices counting within a block.

Index `block_numel` is the "absent" slot: an exactly-zero coefficient (only
a block with fewer than k nonzero coefficients, such as an all-zero one, has them
among its top-k) is sent there, so that 1-bit signs never turn a zero into +-1 and
an absent coefficient never dilutes a mean. Decoders scatter into one extra slot
per block and drop it. That is matsim's default (zero_blocks "absent"); DeMo's
reference optimizer and Psyche send those zeros at their top-k indices, where they
count in the receivers' per-coefficient mean, and Psyche's 1-bit quantizer (the
sign bit of +0.0 is clear) turns them into +1 (zero_blocks "sent"). Ties among
equal magnitudes, zeros included, go to the lowest index (`top_k`).
"""
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sim.config import DistroConfig
from sim.errors import ConfigError, ShapeMismatch


@functools.lru_cache(maxsize=1024)
def chunk_size(n: int, chunk: int) -> int:
    """Largest divisor of n not above chunk (a dimension the chunk does not divide)."""
    return max(d for d in range(1, min(n, chunk) + 1) if n % d == 0)


@functools.lru_cache(maxsize=256)
def _dct_matrix_cpu(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis


@functools.lru_cache(maxsize=256)
def dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (D @ D.T == I), built in float64 once per size."""
    return _dct_matrix_cpu(n).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class ChunkGrid:
    """How a tensor of `shape` is cut into DCT blocks."""
    shape: tuple[int, ...]
    block: tuple[int, ...]

    @classmethod
    def of(cls, shape, chunk: int) -> "ChunkGrid":
        return _grid(tuple(shape), chunk)

    @functools.cached_property
    def blocks(self) -> tuple[int, ...]:
        return tuple(n // b for n, b in zip(self.shape, self.block))

    @functools.cached_property
    def block_numel(self) -> int:
        return math.prod(self.block)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[*lead, *shape] -> DCT coefficients [*lead, *blocks, block_numel]. Leading dimensions
        encode a stack of same-grid tensors (peers' deltas) in one batched product."""
        mats = [dct_matrix(b, x.dtype, x.device) for b in self.block]
        lead = x.shape[:x.ndim - len(self.shape)]
        if len(self.shape) == 1:
            return x.reshape(*lead, self.blocks[0], self.block[0]) @ mats[0].T
        (nr, nc), (cr, cc) = self.blocks, self.block
        tiles = x.reshape(*lead, nr, cr, nc, cc).transpose(-3, -2)
        return (mats[0] @ tiles @ mats[1].T).reshape(*lead, nr, nc, cr * cc)

    def decode(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Inverse of encode: [*lead, *blocks, block_numel] -> [*lead, *shape]. Leading
        dimensions decode a stack of same-grid tensors in one batched product."""
        return self.assemble(self.decode_blocks(coeffs))

    def decode_pairs(self, indices: torch.Tensor, values: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Decode (index, value) pairs [*lead, *blocks, n] into [*lead, *shape]: pairs naming one
        coefficient are averaged ("mean": coefficient_mean) or added ("sum": coefficient_sum)."""
        return self.assemble(self.decode_block_pairs(indices, values, reduce))

    def decode_blocks(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Coefficients [..., block_numel] -> the blocks they transform back to, [..., *block].
        Only the block size matters: blocks of this size from any tensors decode together."""
        mats = [dct_matrix(b, coeffs.dtype, coeffs.device) for b in self.block]
        if len(self.block) == 1:
            return coeffs @ mats[0]
        return mats[0].T @ coeffs.unflatten(-1, self.block) @ mats[1]

    def decode_block_pairs(self, indices: torch.Tensor, values: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """`decode_blocks` from (index, value) pairs [..., n] per block, combined by `reduce`.

        Top-k leaves few pairs per block, so each block is built from its pairs' basis
        products, [c, n] @ [n, c], instead of scattering dense coefficients and multiplying
        by whole DCT matrices: n multiply-adds per element instead of sum(block). Past
        n = sum(block) / 2 (many peers) the dense route is the cheaper one and is taken."""
        if reduce not in ("mean", "sum"):
            raise ConfigError(f"reduce {reduce!r} is unknown: valid are 'mean' and 'sum'")
        if 2 * indices.shape[-1] > sum(self.block):
            combine = coefficient_mean if reduce == "mean" else coefficient_sum
            return self.decode_blocks(combine(self, indices, values))
        absent = indices == self.block_numel
        weights = torch.where(absent, 0.0, values)
        if reduce == "mean":  # how many pairs of the block name each pair's coefficient
            weights = weights / (indices.unsqueeze(-1) == indices.unsqueeze(-2)).sum(-1)
        idx = indices.long().clamp(max=self.block_numel - 1)  # the absent slot weighs 0 anywhere
        mats = [dct_matrix(b, values.dtype, values.device) for b in self.block]
        if len(self.block) == 1:
            return (weights.unsqueeze(-1) * mats[0][idx]).sum(-2)
        cc = self.block[1]
        rows = mats[0][idx // cc] * weights.unsqueeze(-1)          # [..., n, cr]
        return rows.transpose(-1, -2) @ mats[1][idx % cc]          # [..., cr, cc]

    def assemble(self, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks [*lead, *blocks, *block] -> the tensor they tile, [*lead, *shape]."""
        lead = blocks.shape[:blocks.ndim - 2 * len(self.shape)]
        if len(self.shape) == 1:
            return blocks.reshape(*lead, *self.shape)
        return blocks.transpose(-3, -2).reshape(*lead, *self.shape)


@functools.lru_cache(maxsize=4096)
def _grid(shape: tuple[int, ...], chunk: int) -> ChunkGrid:
    if len(shape) not in (1, 2) or min(shape) < 1:
        raise ShapeMismatch(f"DisTrO compresses 1-D and 2-D tensors, got shape {list(shape)}")
    return ChunkGrid(shape, tuple(chunk_size(n, chunk) for n in shape))


@dataclass
class Sparse:
    """Top-k DCT coefficients of one tensor: indices/values of shape [*grid.blocks, k]."""
    grid: ChunkGrid
    indices: torch.Tensor
    values: torch.Tensor


def compress(x: torch.Tensor, chunk: int, topk: int, lead: int = 0, zero_blocks: str = "absent") -> Sparse:
    """Top-k DCT coefficients of x per block; with `lead` leading dimensions, of each tensor
    of a stack (indices and values then [*lead, *blocks, k]). Exact zeros among them go to
    the absent slot, or with `zero_blocks` "sent" stay at their indices (see the module doc)."""
    grid = ChunkGrid.of(x.shape[lead:], chunk)
    coeffs = grid.encode(x)
    k = min(topk, grid.block_numel)
    indices = top_k(coeffs, k)
    values = coeffs.gather(-1, indices)
    if zero_blocks == "absent":
        indices = torch.where(values == 0, grid.block_numel, indices)
    return Sparse(grid, indices, values)


KEY_MANTISSA = 32   # bits of a magnitude's mantissa that rank it (float32's 23 all count)


def top_k(coeffs: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest-magnitude coefficients along the last dimension.

    Magnitudes rank at KEY_MANTISSA bits of mantissa, and equal ranks go to the lowest index.
    Structured gradients make exact ties (an embedding block with two rows set can hold pairs
    of equal magnitudes), and computations that differ only in round-off, a batched and a
    serial peer or two implementations, must still send the same coefficients: a tie broken
    by round-off would not be. A non-negative float64's bits, read as an integer, order as
    the float does, so the rank is its top bits followed by the reversed index."""
    n = coeffs.shape[-1]
    magnitude = coeffs.abs().double().view(torch.int64) >> (52 - KEY_MANTISSA)
    rank = (magnitude << (n - 1).bit_length()) | (n - 1 - torch.arange(n, device=coeffs.device))
    return rank.topk(k, dim=-1, sorted=False).indices


def quantize_1bit(sparse: Sparse, zero_blocks: str = "absent") -> Sparse:
    """Values -> +-1. Absent entries keep value 0 (they are dropped on decode anyway); with
    `zero_blocks` "sent", a value's sign bit decides as in Psyche's
    quantize_nozeros_tensor_to_boolean_sign, so a +0.0 goes out as +1."""
    if zero_blocks == "sent":
        return Sparse(sparse.grid, sparse.indices, torch.where(sparse.values.signbit(), -1.0, 1.0).to(sparse.values))
    return Sparse(sparse.grid, sparse.indices, sparse.values.sign())


def coefficient_mean(grid: ChunkGrid, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Scatter (index, value) pairs with reduce "mean" and no self term: each coefficient is
    the mean over the entries that name it, zero where none do. Indices [*lead, *blocks, n]."""
    out = values.new_zeros(*indices.shape[:-1], grid.block_numel + 1)
    out.scatter_reduce_(-1, indices.long(), values, reduce="mean", include_self=False)
    return out[..., :-1]


def coefficient_sum(grid: ChunkGrid, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Like coefficient_mean, but summed: decode is linear, so the sum of many payloads'
    decodes is one decode of their summed coefficients."""
    out = values.new_zeros(*indices.shape[:-1], grid.block_numel + 1)
    out.scatter_add_(-1, indices.long(), values)
    return out[..., :-1]


def decompress(sparse: Sparse) -> torch.Tensor:
    return sparse.grid.decode_pairs(sparse.indices, sparse.values)


def batch_decompress(sparses: list[Sparse]) -> torch.Tensor:
    """Homogeneous fast path (Psyche/DeMo): concatenate every payload's pairs, one
    scatter-mean, one decode. All payloads must share one chunk grid."""
    grid = sparses[0].grid
    if any(s.grid != grid for s in sparses):
        raise ShapeMismatch(f"batch_decompress needs one chunk grid, got {sorted({s.grid.shape for s in sparses})}")
    indices = torch.cat([s.indices for s in sparses], dim=-1)
    values = torch.cat([s.values for s in sparses], dim=-1)
    return grid.decode_pairs(indices, values)


@dataclass
class DistroState:
    """One peer's DisTrO state: the momentum/residual `delta` per parameter (local shape)."""
    config: DistroConfig
    delta: dict[str, torch.Tensor]
    anchors: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def fresh(cls, config: DistroConfig) -> "DistroState":
        return cls(config, {})

    def step(self, name: str, grad: torch.Tensor, lr: float, anchor: torch.Tensor | None = None
             ) -> tuple[Sparse, torch.Tensor]:
        """delta = decay * delta + lr * grad; send top-k of DCT(delta); keep the rest.

        Returns what goes on the wire (signs when quantize_1bit) and the decoded
        full-precision transmitted part, which error feedback removed from delta.
        `anchor` names what the rows of `grad` are (helper neurons): when it changes,
        the residual restarts, since its rows would now land on other neurons."""
        (sent,), transmitted = step_stacked([self], name, grad.unsqueeze(0), lr, anchor)
        return sent, transmitted[0]


def step_stacked(states: Sequence[DistroState], name: str, grads: torch.Tensor, lr: float,
                 anchor: torch.Tensor | None = None) -> tuple[list[Sparse], torch.Tensor]:
    """`DistroState.step` of several peers at once, grads [peers, *shape]: one stacked
    encode, top-k and decode. Each peer keeps its own delta (a slice of the stack)."""
    cfg, deltas = states[0].config, []
    for state in states:
        delta = state.delta.get(name)
        if anchor is not None and (name not in state.anchors or not torch.equal(state.anchors[name], anchor)):
            state.anchors[name], delta = anchor, None
        deltas.append(torch.zeros_like(grads[0]) if delta is None else delta)
    delta = torch.stack(deltas)
    delta.mul_(cfg.compression_decay).add_(grads, alpha=lr)
    sparse = compress(delta, cfg.compression_chunk, cfg.compression_topk, lead=1, zero_blocks=cfg.zero_blocks)
    transmitted = sparse.grid.decode_pairs(sparse.indices, sparse.values)
    if sparse.indices.shape[-1] == sparse.grid.block_numel:
        # Lossless (top-k keeps every coefficient): nothing is left behind. Subtracting would
        # leave DCT round-off, which would come back next round as coefficients of a block
        # with no gradient and count in COEFF_MEAN's per-coefficient mean.
        delta.zero_()
    else:
        delta.sub_(transmitted)
    for state, own in zip(states, delta.unbind(0)):
        state.delta[name] = own
    sent = quantize_1bit(sparse, cfg.zero_blocks) if cfg.quantize_1bit else sparse
    return [Sparse(sent.grid, i, v) for i, v in zip(sent.indices.unbind(0), sent.values.unbind(0))], transmitted
