"""Payloads on the wire: a documented, versioned byte format (no pickle).

    offset  size  field
    0       4     magic b"MSIM"
    4       2     format version, little-endian uint16 (this is version 1)
    6       4     header length H, little-endian uint32
    10      H     header: UTF-8 JSON {"peer", "round", "tiers", "chunk", "quantized",
                  "params": {name: {"shape": [...], "k": int}}}
    10+H    B     body: safetensors bytes; per parameter "<name>/idx" (int16, or int32 for
                  blocks of 32767+ coefficients) and "<name>/val" (float32) or, when
                  quantized, "<name>/sign" (uint8, numpy.packbits of value > 0)
    end-32  32    sha256 of every byte before it

`decode_payload` never raises into a round: every malformed input comes back
as a `Rejection` with one of `REASONS`, for the receiver to count and log.
"""
import hashlib
import json
import struct
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch

from sim.config import DistroConfig, ModelConfig
from sim.distro import ChunkGrid, Sparse
from sim.errors import SimError
from sim.model import local_shapes

MAGIC, VERSION = b"MSIM", 1
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


def index_dtype(grid: ChunkGrid) -> torch.dtype:
    return torch.int16 if grid.block_numel + 1 <= torch.iinfo(torch.int16).max else torch.int32


def encode_payload(payload: Payload, chunk: int) -> bytes:
    header = {"peer": payload.peer, "round": payload.round, "tiers": list(payload.tiers), "chunk": chunk,
              "quantized": payload.quantized, "params": {}}
    tensors = {}
    for name, sparse in payload.params.items():
        header["params"][name] = {"shape": list(sparse.grid.shape), "k": sparse.indices.shape[-1]}
        # Copies: safetensors refuses tensors that share memory, and a payload must not alias live state.
        tensors[f"{name}/idx"] = sparse.indices.to(device="cpu", dtype=index_dtype(sparse.grid), copy=True)
        values = sparse.values.detach().to(device="cpu", dtype=torch.float32, copy=True)
        if payload.quantized:
            bits = np.packbits((values > 0).numpy().reshape(-1))
            tensors[f"{name}/sign"] = torch.from_numpy(bits)
        else:
            tensors[f"{name}/val"] = values
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
        expected_shapes = local_shapes(model, tiers)
    except (SimError, TypeError) as err:
        raise _Reject("bad_tier", f"tiers {list(tiers)}: {err}") from None

    unknown, missing = set(params) - set(expected_shapes), set(expected_shapes) - set(params)
    _expect(not unknown, "unknown_parameter", f"parameters {sorted(unknown)[:3]} are not in the model")
    _expect(not missing, "missing_parameter", f"parameters {sorted(missing)[:3]} are missing")
    decoded = {}
    for name, meta in params.items():
        decoded[name] = _decode_param(name, meta, tensors, expected_shapes[name], distro, quantized)
    return Payload(peer, rnd, tiers, decoded, quantized)


def _decode_param(name, meta, tensors, expected_shape, distro: DistroConfig, quantized: bool) -> Sparse:
    shape = tuple(meta.get("shape", ())) if isinstance(meta, dict) else ()
    _expect(shape == expected_shape, "bad_shape", f"{name}: shape {list(shape)} is not {list(expected_shape)} "
                                                  f"for the sender's tiers")
    grid = ChunkGrid.of(shape, distro.compression_chunk)
    k = min(distro.compression_topk, grid.block_numel)
    _expect(meta.get("k") == k, "bad_shape", f"{name}: k {meta.get('k')} is not {k}")
    indices = tensors.get(f"{name}/idx")
    _expect(indices is not None, "malformed", f"{name}: no index tensor")
    _expect(indices.dtype == index_dtype(grid), "bad_dtype", f"{name}: indices are {indices.dtype}, "
                                                             f"expected {index_dtype(grid)}")
    _expect(tuple(indices.shape) == (*grid.blocks, k), "bad_shape",
            f"{name}: indices of shape {list(indices.shape)}, expected {[*grid.blocks, k]}")
    indices = indices.long()
    _expect(bool(((indices >= 0) & (indices <= grid.block_numel)).all()), "index_out_of_range",
            f"{name}: an index is outside [0, {grid.block_numel}]")
    ordered = indices.sort(dim=-1).values
    repeats = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] != grid.block_numel)
    _expect(not bool(repeats.any()), "duplicate_index", f"{name}: a block names one coefficient twice")
    count = indices.numel()
    if quantized:
        bits = tensors.get(f"{name}/sign")
        _expect(bits is not None, "malformed", f"{name}: no sign tensor")
        _expect(bits.dtype == torch.uint8, "bad_dtype", f"{name}: signs are {bits.dtype}, expected uint8")
        _expect(bits.numel() == (count + 7) // 8, "bad_shape", f"{name}: {bits.numel()} sign bytes for {count} values")
        signs = np.unpackbits(bits.numpy(), count=count).astype(np.float32) * 2 - 1
        values = torch.from_numpy(signs).reshape(indices.shape)
        values = torch.where(indices == grid.block_numel, 0.0, values)
    else:
        values = tensors.get(f"{name}/val")
        _expect(values is not None, "malformed", f"{name}: no value tensor")
        _expect(values.dtype == torch.float32, "bad_dtype", f"{name}: values are {values.dtype}, expected float32")
        _expect(values.shape == indices.shape, "bad_shape", f"{name}: values and indices differ in shape")
        _expect(bool(torch.isfinite(values).all()), "non_finite", f"{name}: a value is NaN or infinite")
    return Sparse(grid, indices, values)


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
