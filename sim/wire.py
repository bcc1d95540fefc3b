"""Payloads on the wire: a documented, versioned byte format (no pickle).

    offset  size  field
    0       4     magic b"MSIM"
    4       2     format version, little-endian uint16 (this is version 2)
    6       4     header length H, little-endian uint32
    10      H     header: UTF-8 JSON {"peer", "round", "tiers", "chunk", "quantized",
                  "params": {name: {"shape": [...], "k": int}}}
    10+H    B     body: safetensors bytes with two tensors, every parameter's pairs
                  concatenated in the header's (sorted) parameter order:
                  "idx" (int16, or int32 when a block has 32767+ coefficients) and
                  "val" (float32) or, when quantized, "sign" (uint8, numpy.packbits
                  of value > 0)
    end-32  32    sha256 of every byte before it

One flat index and one flat value tensor per payload (version 1 had two per
parameter) so that encoding, validation and decoding are a few vectorized
operations whatever the number of parameters: the harness overhead budget.

`decode_payload` never raises into a round: every malformed input comes back
as a `Rejection` with one of `REASONS`, for the receiver to count and log.
"""
import bisect
import functools
import hashlib
import itertools
import json
import math
import struct
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch

from sim.config import DistroConfig, ModelConfig
from sim.distro import ChunkGrid, Sparse
from sim.errors import SimError
from sim.model import local_shapes

MAGIC, VERSION = b"MSIM", 2
PREFIX = struct.Struct("<4sHI")
DIGEST = 32
REASONS = ("truncated", "bad_magic", "bad_checksum", "bad_version", "malformed", "bad_tier",
           "unknown_parameter", "missing_parameter", "bad_shape", "bad_dtype", "index_out_of_range",
           "duplicate_index", "non_finite", "chunk_grid_mismatch", "stale_round", "duplicate")


@dataclass
class Payload:
    """One peer's update for one round: a Sparse per parameter, in the peer's local shapes."""
    peer: int
    round: int
    tiers: tuple[int, ...]
    params: dict[str, Sparse]
    quantized: bool


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


def index_dtype(grids) -> torch.dtype:
    """int16 unless some block (plus its absent slot) needs more: one dtype per payload."""
    widest = max(grid.block_numel for grid in grids)
    return torch.int16 if widest + 1 <= torch.iinfo(torch.int16).max else torch.int32


@dataclass(frozen=True)
class Layout:
    """Where each parameter's pairs sit in the flat tensors of a payload at some tiers."""
    grids: dict[str, ChunkGrid]       # sorted by name: the body's order
    k: dict[str, int]
    sizes: tuple[int, ...]            # pairs per parameter, in order
    dtype: torch.dtype
    absent: torch.Tensor              # per pair: its block's absent slot (= block_numel)
    row: torch.Tensor                 # per pair: a number unique to its block
    stride: int                       # above every index: row * stride + index names one coefficient


@functools.lru_cache(maxsize=256)
def layout(model: ModelConfig, distro: DistroConfig, tiers: tuple) -> Layout:
    """The layout every payload from a peer at `tiers` must have (cached: it is the same every round)."""
    grids = {name: ChunkGrid.of(shape, distro.compression_chunk)
             for name, shape in sorted(local_shapes(model, tiers).items())}
    ks = {name: min(distro.compression_topk, grid.block_numel) for name, grid in grids.items()}
    blocks = [math.prod(grid.blocks) for grid in grids.values()]
    absent = [torch.full((b * ks[name],), grid.block_numel, dtype=torch.int32)
              for b, (name, grid) in zip(blocks, grids.items())]
    first = [0, *itertools.accumulate(blocks)]
    rows = [torch.arange(first[i], first[i + 1]).repeat_interleave(ks[name]) for i, name in enumerate(grids)]
    return Layout(grids, ks, tuple(b * ks[name] for b, name in zip(blocks, grids)), index_dtype(grids.values()),
                  torch.cat(absent), torch.cat(rows), max(grid.block_numel for grid in grids.values()) + 1)


def encode_payload(payload: Payload, chunk: int) -> bytes:
    header = {"peer": payload.peer, "round": payload.round, "tiers": list(payload.tiers), "chunk": chunk,
              "quantized": payload.quantized, "params": {}}
    names = sorted(payload.params)
    sparses = [payload.params[name] for name in names]
    for name, sparse in zip(names, sparses):
        header["params"][name] = {"shape": list(sparse.grid.shape), "k": sparse.indices.shape[-1]}
    dtype = index_dtype(s.grid for s in sparses)
    # torch.cat copies: a payload never aliases live state.
    tensors = {"idx": torch.cat([s.indices.reshape(-1).to(device="cpu", dtype=dtype) for s in sparses])}
    values = torch.cat([s.values.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for s in sparses])
    if payload.quantized:
        tensors["sign"] = torch.from_numpy(np.packbits((values > 0).numpy()))
    else:
        tensors["val"] = values
    return frame(header, tensors)


def frame(header: dict, tensors: dict[str, torch.Tensor], version: int = VERSION) -> bytes:
    """Magic, version, JSON header, safetensors body and checksum around a payload's parts."""
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    body = PREFIX.pack(MAGIC, version, len(head)) + head + safetensors.torch.save(tensors)
    return body + hashlib.sha256(body).digest()


class _Reject(SimError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.rejection = Rejection(reason, detail)


def _expect(ok: bool, reason: str, detail: str):
    if not ok:
        raise _Reject(reason, detail)


def decode_payload(data: bytes, model: ModelConfig, distro: DistroConfig) -> Payload | Rejection:
    """Parse and validate one payload against the run's model and DisTrO settings."""
    try:
        return _decode(data, model, distro)
    except _Reject as rejected:
        return rejected.rejection


def _decode(data: bytes, model: ModelConfig, distro: DistroConfig) -> Payload:
    _expect(isinstance(data, (bytes, bytearray)) and len(data) >= PREFIX.size + DIGEST, "truncated",
            f"payload of {len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__} bytes "
            f"is shorter than the {PREFIX.size + DIGEST}-byte frame")
    data = bytes(data)
    magic, version, head_len = PREFIX.unpack_from(data)
    _expect(magic == MAGIC, "bad_magic", f"magic {magic!r} is not {MAGIC!r}")
    _expect(hashlib.sha256(data[:-DIGEST]).digest() == data[-DIGEST:], "bad_checksum", "sha256 does not match")
    _expect(version == VERSION, "bad_version", f"format version {version} is not {VERSION}")
    _expect(PREFIX.size + head_len <= len(data) - DIGEST, "truncated", f"header length {head_len} overruns the payload")
    try:
        header = json.loads(data[PREFIX.size:PREFIX.size + head_len])
        tensors = safetensors.torch.load(data[PREFIX.size + head_len:-DIGEST])
        peer, rnd, tiers = header["peer"], header["round"], tuple(header["tiers"])
        chunk, quantized, params = header["chunk"], header["quantized"], header["params"]
    except Exception as err:  # untrusted bytes: any parse failure (json, safetensors, keys) is "malformed"
        raise _Reject("malformed", f"header or body does not parse: {type(err).__name__}: {err}") from None
    _expect(all(isinstance(v, int) and not isinstance(v, bool) for v in (peer, rnd, chunk)) and isinstance(quantized, bool)
            and isinstance(params, dict), "malformed", "peer, round and chunk must be integers, quantized a bool")
    _expect(chunk == distro.compression_chunk, "malformed", f"chunk {chunk} is not the run's {distro.compression_chunk}")
    _expect(quantized == distro.quantize_1bit, "malformed", f"quantized={quantized} disagrees with the run's quantize_1bit")
    try:
        expected = layout(model, distro, tiers)
    except (SimError, TypeError) as err:
        raise _Reject("bad_tier", f"tiers {list(tiers)}: {err}") from None

    unknown, missing = set(params) - set(expected.grids), set(expected.grids) - set(params)
    _expect(not unknown, "unknown_parameter", f"parameters {sorted(unknown)[:3]} are not in the model")
    _expect(not missing, "missing_parameter", f"parameters {sorted(missing)[:3]} are missing")
    for name, grid in expected.grids.items():
        meta = params[name]
        shape = tuple(meta.get("shape", ())) if isinstance(meta, dict) else ()
        _expect(shape == grid.shape, "bad_shape", f"{name}: shape {list(shape)} is not {list(grid.shape)} "
                                                  f"for the sender's tiers")
        _expect(meta.get("k") == expected.k[name], "bad_shape", f"{name}: k {meta.get('k')} is not {expected.k[name]}")
    indices, values = _pairs_of(tensors, expected, quantized)
    return Payload(peer, rnd, tiers, _split(expected, indices, values), quantized)


def _pairs_of(tensors: dict, expected: Layout, quantized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat (indices, values), validated against the layout with a few whole-payload operations."""
    count = expected.absent.numel()
    indices = tensors.get("idx")
    _expect(indices is not None, "malformed", "no index tensor")
    _expect(indices.dtype == expected.dtype, "bad_dtype", f"indices are {indices.dtype}, expected {expected.dtype}")
    _expect(tuple(indices.shape) == (count,), "bad_shape", f"{list(indices.shape)} indices, expected [{count}]")
    indices = indices.long()
    in_range = (indices >= 0) & (indices <= expected.absent)
    if not bool(in_range.all()):
        at = int((~in_range).nonzero()[0])
        raise _Reject("index_out_of_range", f"{_owner(expected, at)}: index {int(indices[at])} is outside "
                                            f"[0, {int(expected.absent[at])}]")
    absent = indices == expected.absent
    # A pair is (block, index): sorted, a repeat is two equal neighbours. Absent slots may repeat,
    # so each gets a distinct negative key.
    keys = torch.where(absent, -1 - torch.arange(count), expected.row * expected.stride + indices)
    ordered = keys.sort().values
    _expect(not bool((ordered[1:] == ordered[:-1]).any()), "duplicate_index", "a block names one coefficient twice")
    if quantized:
        bits = tensors.get("sign")
        _expect(bits is not None, "malformed", "no sign tensor")
        _expect(bits.dtype == torch.uint8, "bad_dtype", f"signs are {bits.dtype}, expected uint8")
        _expect(bits.numel() == (count + 7) // 8, "bad_shape", f"{bits.numel()} sign bytes for {count} values")
        signs = torch.from_numpy(np.unpackbits(bits.numpy(), count=count).astype(np.float32) * 2 - 1)
        values = torch.where(absent, 0.0, signs)
    else:
        values = tensors.get("val")
        _expect(values is not None, "malformed", "no value tensor")
        _expect(values.dtype == torch.float32, "bad_dtype", f"values are {values.dtype}, expected float32")
        _expect(tuple(values.shape) == (count,), "bad_shape", f"{list(values.shape)} values for {count} indices")
        _expect(bool(torch.isfinite(values).all()), "non_finite", "a value is NaN or infinite")
    return indices, values


def _owner(expected: Layout, at: int) -> str:
    """The parameter whose pairs include flat position `at`."""
    return list(expected.grids)[bisect.bisect_right(list(itertools.accumulate(expected.sizes)), at)]


def _split(expected: Layout, indices: torch.Tensor, values: torch.Tensor) -> dict[str, Sparse]:
    params = {}
    for (name, grid), idx, val in zip(expected.grids.items(), indices.split(expected.sizes),
                                      values.split(expected.sizes)):
        shape = (*grid.blocks, expected.k[name])
        params[name] = Sparse(grid, idx.view(shape), val.view(shape))
    return params


def payload_size(model: ModelConfig, distro: DistroConfig, tiers) -> int:
    """Bytes of one peer's payload at `tiers`: fixed by shapes, k and quantization alone."""
    params = {}
    for name, shape in local_shapes(model, tiers).items():
        grid = ChunkGrid.of(shape, distro.compression_chunk)
        k = min(distro.compression_topk, grid.block_numel)
        params[name] = Sparse(grid, torch.zeros(*grid.blocks, k, dtype=torch.long), torch.zeros(*grid.blocks, k))
    return len(encode_payload(Payload(0, 0, tuple(tiers), params, distro.quantize_1bit), distro.compression_chunk))


def dense_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """What the same update would cost sent dense in fp32."""
    return 4 * sum(int(np.prod(s)) for s in shapes.values())
