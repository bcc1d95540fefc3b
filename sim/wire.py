"""Payloads on the wire: a documented, versioned byte format (no pickle).

    offset  size  field
    0       4     magic b"MSIM"
    4       2     format version, little-endian uint16 (this is version 2)
    6       4     header length H, little-endian uint32
    10      H     header: UTF-8 JSON {"peer", "round", "tiers", "chunk", "quantized",
                  "params": {name: {"shape": [...], "k": int}},
                  "helper_neurons": [count per layer], "helpers": {name: {"shape", "k"}}}
    10+H    B     body: safetensors bytes. "idx" (int16, or int32 when a block has
                  32767+ coefficients) and "val" (float32; float64 in a float64 run,
                  whose receivers expect it) or, when quantized, "sign"
                  (uint8, numpy.packbits of value > 0) hold every parameter's pairs
                  in sorted name order, then every helper slab's in sorted name order;
                  "neurons" (int32; only with helpers) the helper neuron indices,
                  layer by layer, each layer's sorted
    end-32  32    sha256 of every byte before it

Helper mode (sim/helper.py): a helper slab is the DisTrO-compressed gradient of
an MLP tensor at its layer's helper neurons (rows of gate/up, columns of down),
a tensor of `count` neurons along the FFN axis; receivers place it at those
neurons with `align_sparse_grad`. Helper neurons must lie in the sender's suffix
[width, I) of their layer, sorted and unique, else the payload is rejected as
"bad_helper".

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
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from sim.config import DistroConfig, ModelConfig
from sim.distro import ChunkGrid, Sparse
from sim.errors import SimError
from sim.model import helper_shapes, local_shapes
from sim.tiers import layer_widths

MAGIC, VERSION = b"MSIM", 2
PREFIX = struct.Struct("<4sHI")
DIGEST = 32
REASONS = ("truncated", "bad_magic", "bad_checksum", "bad_version", "malformed", "bad_tier",
           "unknown_parameter", "missing_parameter", "bad_shape", "bad_dtype", "index_out_of_range",
           "duplicate_index", "non_finite", "bad_helper", "chunk_grid_mismatch", "stale_round", "duplicate")


class HashOnce(tuple):
    """A tuple that computes its hash once. Signatures and receivers are cache keys looked up
    many times a round, and hashing one hashes every tensor's chunk grid again."""

    def __new__(cls, items=()):
        key = super().__new__(cls, items)
        key._hash = tuple.__hash__(key)
        return key

    def __hash__(self):
        return self._hash


@dataclass(frozen=True)
class Pairs:
    """Tensors' top-k (indices, values) flattened and laid end to end: how they travel, and
    how a receiver gathers its blocks from them in a few calls, whatever their number."""
    signature: tuple[tuple[str, ChunkGrid, int], ...]   # (name, chunk grid, k) of each tensor, in order
    indices: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, sparses: Mapping[str, Sparse]) -> "Pairs":
        return cls(HashOnce(signature(sparses.items())), _flat([s.indices for s in sparses.values()]),
                   _flat([s.values for s in sparses.values()]))

    def split(self) -> dict[str, Sparse]:
        """Each tensor's Sparse, as views."""
        sizes = pair_counts(self.signature)
        return {name: Sparse(grid, i.view(*grid.blocks, k), v.view(*grid.blocks, k)) for (name, grid, k), i, v
                in zip(self.signature, self.indices.split(sizes), self.values.split(sizes))}


def signature(sparses) -> tuple:
    """`Pairs.signature` of (name, Sparse) items, in their order (a plain tuple: wrap it in
    HashOnce where it is a key looked up more than once)."""
    return tuple((name, s.grid, s.indices.shape[-1]) for name, s in sparses)


def pair_counts(signature) -> list[int]:
    """How many (index, value) pairs each tensor of a signature holds: k per block."""
    return [math.prod(grid.blocks) * k for _, grid, k in signature]


class _SplitOnDemand(Mapping):
    """A decoded payload's `params`: its pairs split into per-tensor views on first use. A
    receiver gathering from `Payload.pairs()` never needs them, and a split costs a few
    calls per tensor, which on a small model is a third of a decode."""

    def __init__(self, pairs: Pairs):
        self._pairs, self._split = pairs, None

    def __getitem__(self, name: str) -> Sparse:
        if self._split is None:
            self._split = self._pairs.split()
        return self._split[name]

    def __iter__(self):
        return (name for name, _, _ in self._pairs.signature)

    def __len__(self) -> int:
        return len(self._pairs.signature)


@dataclass
class Payload:
    """One peer's update for one round: a Sparse per parameter, in the peer's local shapes,
    and in helper mode a Sparse per MLP tensor of the helper neurons' slab."""
    peer: int
    round: int
    tiers: tuple[int, ...]
    params: Mapping[str, Sparse]
    quantized: bool
    helper_neurons: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> sorted neuron indices
    helper_params: dict[str, Sparse] = field(default_factory=dict)          # MLP name -> slab [count along FFN axis]
    flat: Pairs | None = field(default=None, repr=False, compare=False)     # `params` as they came off the wire

    def pairs(self) -> Pairs:
        """`params` flattened: as they came off the wire, else built now (from the tensors as they are)."""
        return self.flat if self.flat is not None else Pairs.of(self.params)


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
    """Where each tensor's pairs sit in the flat tensors of a payload at some tiers and helper
    counts. The per-pair tables are numpy arrays: validation runs in numpy (see `_pairs_of`)."""
    params: dict[str, ChunkGrid]      # sorted by name: the body's order
    helpers: dict[str, ChunkGrid]     # helper slabs, sorted by name, after the params
    signature: tuple[HashOnce, HashOnce]  # `Pairs.signature` of the params, then of the helper slabs
    sizes: tuple[int, ...]            # pairs per entry (params, then helpers)
    dtype: torch.dtype
    absent: np.ndarray                # per pair: its block's absent slot (= block_numel)
    block_key: np.ndarray             # per pair: a multiple of a number above every index, unique to its block,
                                      # so block_key + index names one coefficient of the payload
    absent_key: np.ndarray            # per pair: a distinct negative key (absent slots may repeat)
    neuron_low: np.ndarray            # per helper neuron: its layer's sender width (the suffix starts there)
    neuron_first: np.ndarray          # per helper neuron: True where its layer's list starts
    declared: tuple[dict, dict]       # the header's "params" and "helpers" as an honest sender writes them

    @property
    def entries(self) -> list[tuple[str, ChunkGrid, int]]:
        """(name, chunk grid, k) of every entry, in the body's order."""
        return [*self.signature[0], *self.signature[1]]


def _header_entries(signature) -> dict:
    """A header's entries for tensors of `signature`, as an honest sender writes them."""
    return {name: {"k": k, "shape": list(grid.shape)} for name, grid, k in signature}


@functools.lru_cache(maxsize=256)
def layout(model: ModelConfig, distro: DistroConfig, tiers: tuple, helper_counts: tuple = ()) -> Layout:
    """The layout every payload from a peer at `tiers` (with `helper_counts` neurons per layer)
    must have: cached, since it is the same every round."""
    counts = dict(enumerate(helper_counts))
    widths = layer_widths(model.intermediate_size, tiers, model.num_hidden_layers)
    for layer, count in counts.items():
        if count > model.intermediate_size - widths[layer]:
            raise SimError(f"layer {layer}: {count} helper neurons do not fit the suffix of "
                           f"{model.intermediate_size - widths[layer]}")

    def grids_of(shapes):
        return {name: ChunkGrid.of(shape, distro.compression_chunk) for name, shape in sorted(shapes.items())}
    params, helpers = grids_of(local_shapes(model, tiers)), grids_of(helper_shapes(model, counts))
    grids = [*params.values(), *helpers.values()]
    ks = [min(distro.compression_topk, grid.block_numel) for grid in grids]
    blocks = [math.prod(grid.blocks) for grid in grids]
    entries = list(zip([*params, *helpers], grids, ks))
    sizes = pair_counts(entries)
    absent = np.repeat([grid.block_numel for grid in grids], sizes).astype(np.int64)
    stride = max(grid.block_numel for grid in grids) + 1
    block_key = np.repeat(np.arange(sum(blocks), dtype=np.int64), np.repeat(ks, blocks)) * stride
    neuron_low = np.repeat([widths[layer] for layer in counts], list(counts.values())).astype(np.int64)
    neuron_first = np.concatenate([np.arange(count) == 0 for count in counts.values()] or [np.zeros(0, dtype=bool)])
    signatures = HashOnce(entries[:len(params)]), HashOnce(entries[len(params):])
    return Layout(params, helpers, signatures, tuple(sizes), index_dtype(grids), absent, block_key,
                  -1 - np.arange(absent.size), neuron_low, neuron_first, tuple(map(_header_entries, signatures)))


def encode_payload(payload: Payload, chunk: int) -> bytes:
    layers = len(payload.tiers)
    counts = [int(payload.helper_neurons[i].numel()) if i in payload.helper_neurons else 0 for i in range(layers)]
    params, helpers = sorted(payload.params.items()), sorted(payload.helper_params.items())
    sparses = [s for _, s in params] + [s for _, s in helpers]
    declared = _declared(signature(params), signature(helpers))
    # One flattening copy and one conversion per tensor kind, not one per parameter: per-call
    # costs are most of a small model's encode. A copy: a payload never aliases live state.
    tensors = {"idx": _flat([s.indices for s in sparses]).to(device="cpu", dtype=declared.index_dtype)}
    values = _flat([s.values.detach() for s in sparses])
    values = values.to(device="cpu", dtype=torch.float64 if values.dtype == torch.float64 else torch.float32)
    if payload.quantized:
        tensors["sign"] = torch.from_numpy(np.packbits(values.numpy() > 0))
    else:
        tensors["val"] = values
    if any(counts):
        tensors["neurons"] = torch.cat([payload.helper_neurons[i].to(device="cpu", dtype=torch.int32)
                                        for i in range(layers) if counts[i]])
    # The header as json.dumps(sort_keys=True) writes it. The tensors' entries, the bulk of it
    # and the same every round for a peer, are written once per signature and spliced in.
    head = _json({"peer": payload.peer, "round": payload.round, "tiers": list(payload.tiers), "chunk": chunk,
                  "quantized": payload.quantized, "helper_neurons": counts, "helpers": _SLOT, "params": _SLOT})
    for part in (declared.helpers, declared.params):  # key order; nothing before them is a string
        head = head.replace(f'"{_SLOT}"', part, 1)
    return _framed(head.encode(), tensors)


_SLOT = "<declared>"


@dataclass(frozen=True)
class _Declaration:
    params: str                # the header's "params" object, as JSON
    helpers: str               # its "helpers" object
    index_dtype: torch.dtype


@functools.lru_cache(maxsize=256)
def _declared(params: tuple, helpers: tuple) -> _Declaration:
    """How a header declares tensors of these signatures ((name, grid, k) in name order)."""
    return _Declaration(_json(_header_entries(params)), _json(_header_entries(helpers)),
                        index_dtype([grid for _, grid, _ in params + helpers]))


def _json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors flattened and laid end to end in one call (torch.cat needs a reshape per
    tensor first). torch's own helper, as DDP's gradient buckets use."""
    return torch._utils._flatten_dense_tensors(tensors) if tensors else torch.zeros(0)


def frame(header: dict, tensors: dict[str, torch.Tensor], version: int = VERSION) -> bytes:
    """Magic, version, JSON header, safetensors body and checksum around a payload's parts."""
    return _framed(_json(header).encode(), tensors, version)


def _framed(head: bytes, tensors: dict[str, torch.Tensor], version: int = VERSION) -> bytes:
    # The numpy writer: the same bytes as safetensors.torch's, at half its cost per payload.
    tensors = safetensors.numpy.save({name: tensor.numpy() for name, tensor in tensors.items()})
    return _sealed(PREFIX.pack(MAGIC, version, len(head)) + head + tensors)


def _sealed(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def resealed(data: bytes, edit) -> bytes:
    """`data` with `edit` applied to the bytes the checksum covers, and the checksum made valid
    again: a frame that passes the checksum and must fail what is checked after it."""
    return _sealed(bytes(edit(bytearray(data[:-DIGEST]))))


class _Reject(SimError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.rejection = Rejection(reason, detail)


def _expect(ok: bool, reason: str, detail: str):
    if not ok:
        raise _Reject(reason, detail)


VALUE_DTYPES = (torch.float32, torch.float64)   # a run's values travel at float32, a float64 run's at float64


def decode_payload(data: bytes, model: ModelConfig, distro: DistroConfig,
                   value_dtype: torch.dtype = torch.float32) -> Payload | Rejection:
    """Parse and validate one payload against the run's model, DisTrO settings and value dtype."""
    if value_dtype not in VALUE_DTYPES:
        raise SimError(f"value dtype {value_dtype} is unsupported: valid are {', '.join(map(str, VALUE_DTYPES))}")
    try:
        return _decode(data, model, distro, value_dtype)
    except _Reject as rejected:
        return rejected.rejection


def _decode(data: bytes, model: ModelConfig, distro: DistroConfig, value_dtype: torch.dtype) -> Payload:
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
        helpers, counts = header["helpers"], tuple(header["helper_neurons"])
    except Exception as err:  # untrusted bytes: any parse failure (json, safetensors, keys) is "malformed"
        raise _Reject("malformed", f"header or body does not parse: {type(err).__name__}: {err}") from None
    _expect(all(isinstance(v, int) and not isinstance(v, bool) for v in (peer, rnd, chunk)) and isinstance(quantized, bool)
            and isinstance(params, dict) and isinstance(helpers, dict), "malformed",
            "peer, round and chunk must be integers, quantized a bool, params and helpers objects")
    _expect(chunk == distro.compression_chunk, "malformed", f"chunk {chunk} is not the run's {distro.compression_chunk}")
    _expect(quantized == distro.quantize_1bit, "malformed", f"quantized={quantized} disagrees with the run's quantize_1bit")
    expected = _layout_of(model, distro, tiers, counts)
    if (params, helpers) != expected.declared:  # one comparison for the honest sender; else find the fault
        _expect_tensors(params, expected.params, "parameters", "for the sender's tiers")
        _expect_tensors(helpers, expected.helpers, "helper slabs", "for the sender's helper counts")
        for meta, (name, _, k) in zip([*map(params.get, expected.params), *map(helpers.get, expected.helpers)],
                                      expected.entries):
            _expect(meta.get("k") == k, "bad_shape", f"{name}: k {meta.get('k')} is not {k}")
    indices, values = _pairs_of(tensors, expected, quantized, value_dtype)
    neurons = _neurons_of(tensors, expected, model.intermediate_size)
    cut = sum(expected.sizes[:len(expected.params)])  # the params' pairs come first, then the helper slabs'
    params, helper_neurons, helpers = Pairs(expected.signature[0], indices[:cut], values[:cut]), {}, {}
    if expected.helpers:
        layers = [layer for layer, count in enumerate(counts) if count]
        helper_neurons = dict(zip(layers, neurons.split([counts[layer] for layer in layers])))
        helpers = Pairs(expected.signature[1], indices[cut:], values[cut:]).split()
    return Payload(peer, rnd, tiers, _SplitOnDemand(params), quantized, helper_neurons, helpers, params)


def _layout_of(model: ModelConfig, distro: DistroConfig, tiers: tuple, counts: tuple) -> Layout:
    """The layout a header's tiers and helper counts promise: one cached lookup for an honest
    sender; else the rejection that names what is wrong, the tiers first."""
    well_formed = len(counts) == len(tiers) and all(type(c) is int and c >= 0 for c in counts)
    try:
        if well_formed:
            return layout(model, distro, tiers, counts)
    except (SimError, TypeError):
        pass
    try:
        layout(model, distro, tiers)
    except (SimError, TypeError) as err:
        raise _Reject("bad_tier", f"tiers {list(tiers)}: {err}") from None
    _expect(well_formed, "bad_helper", f"helper_neurons {list(counts)} must be one count >= 0 per layer")
    try:
        return layout(model, distro, tiers, counts)
    except SimError as err:
        raise _Reject("bad_helper", str(err)) from None


def _expect_tensors(declared: dict, grids: dict[str, ChunkGrid], what: str, why: str) -> None:
    unknown, missing = set(declared) - set(grids), set(grids) - set(declared)
    _expect(not unknown, "unknown_parameter", f"{what} {sorted(unknown)[:3]} are not in the model {why}")
    _expect(not missing, "missing_parameter", f"{what} {sorted(missing)[:3]} are missing")
    for name, grid in grids.items():
        meta = declared[name]
        shape = tuple(meta.get("shape", ())) if isinstance(meta, dict) else ()
        _expect(shape == grid.shape, "bad_shape", f"{name}: shape {list(shape)} is not {list(grid.shape)} {why}")


def _neurons_of(tensors: dict, expected: Layout, full: int) -> torch.Tensor:
    """Helper neuron indices: int32, each in its layer's suffix [width, I), increasing within a layer."""
    count = expected.neuron_low.size
    neurons = tensors.get("neurons")
    if count == 0:
        _expect(neurons is None, "bad_helper", "neuron indices sent without helper counts")
        return torch.zeros(0, dtype=torch.int64)
    _expect(neurons is not None, "bad_helper", "no neuron index tensor")
    _expect(neurons.dtype == torch.int32 and tuple(neurons.shape) == (count,), "bad_helper",
            f"neurons are {neurons.dtype} {list(neurons.shape)}, expected int32 [{count}]")
    neurons = neurons.numpy().astype(np.int64)
    _expect(bool(((neurons >= expected.neuron_low) & (neurons < full)).all()), "bad_helper",
            "a helper neuron lies outside its layer's suffix [width, I)")
    increasing = expected.neuron_first[1:] | (neurons[1:] > neurons[:-1])
    _expect(bool(increasing.all()), "bad_helper", "a layer's helper neurons are not sorted and unique")
    return torch.from_numpy(neurons)


_SIGNS = np.array([-1.0, 1.0], dtype=np.float32)  # a sign bit's value
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _pairs_of(tensors: dict, expected: Layout, quantized: bool, value_dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat (indices, values), validated against the layout with a few whole-payload
    operations. In numpy: a payload's arrays are small, and torch's fixed cost per call
    would be most of the time."""
    count = expected.absent.size
    indices = tensors.get("idx")
    _expect(indices is not None, "malformed", "no index tensor")
    _expect(indices.dtype == expected.dtype, "bad_dtype", f"indices are {indices.dtype}, expected {expected.dtype}")
    _expect(tuple(indices.shape) == (count,), "bad_shape", f"{list(indices.shape)} indices, expected [{count}]")
    indices = indices.numpy().astype(np.int64)
    in_range = (indices >= 0) & (indices <= expected.absent)
    if not in_range.all():
        at = int(np.flatnonzero(~in_range)[0])
        raise _Reject("index_out_of_range", f"{_owner(expected, at)}: index {int(indices[at])} is outside "
                                            f"[0, {int(expected.absent[at])}]")
    absent = indices == expected.absent
    # A pair is (block, index): sorted, a repeat is two equal neighbours. Absent slots may repeat,
    # so each has a distinct negative key.
    keys = np.where(absent, expected.absent_key, expected.block_key + indices)
    keys.sort()
    _expect(not bool((keys[1:] == keys[:-1]).any()), "duplicate_index", "a block names one coefficient twice")
    if quantized:
        bits = tensors.get("sign")
        _expect(bits is not None, "malformed", "no sign tensor")
        _expect(bits.dtype == torch.uint8, "bad_dtype", f"signs are {bits.dtype}, expected uint8")
        _expect(bits.numel() == (count + 7) // 8, "bad_shape", f"{bits.numel()} sign bytes for {count} values")
        values = _SIGNS[np.unpackbits(bits.numpy(), count=count)].astype(_NUMPY[value_dtype], copy=False)
        values[absent] = 0.0
    else:
        values = tensors.get("val")
        _expect(values is not None, "malformed", "no value tensor")
        _expect(values.dtype == value_dtype, "bad_dtype", f"values are {values.dtype}, expected {value_dtype}")
        _expect(tuple(values.shape) == (count,), "bad_shape", f"{list(values.shape)} values for {count} indices")
        values = values.numpy()
        _expect(bool(np.isfinite(values).all()), "non_finite", "a value is NaN or infinite")
    return torch.from_numpy(indices), torch.from_numpy(values)


def _owner(expected: Layout, at: int) -> str:
    """The tensor whose pairs include flat position `at`."""
    return _keys(expected)[bisect.bisect_right(list(itertools.accumulate(expected.sizes)), at)]


def _keys(expected: Layout) -> list[str]:
    return [*expected.params, *("helper:" + name for name in expected.helpers)]


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
