"""Conformance vectors: matsim's cases as files any implementation can run.

`export` writes a deterministic directory (vectors/FORMAT.md): manifest.json, and per
operation <op>.json (the cases) and <op>.safetensors (their tensors). Inputs are drawn
per case from (seed, op, case index); expected outputs are matsim's (sim/conformance.py),
or the kind of error matsim raises. `check` drives an implementation under test through
the line-delimited JSON protocol of sim/conformance.py, one request per case, each under
a timeout, and compares its answers within each case's tolerance.
"""
import hashlib
import json
import math
import queue
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sim.align import CHAPTER_CASES
from sim.checkpoint import tier_config
from sim.config import ModelConfig, load_config
from sim.conformance import FORMAT, OPS, VERSION, error_kind, resolve
from sim.distro import ChunkGrid, compress, quantize_1bit
from sim.errors import SimError
from sim.helper import _suffix_order, epoch_window, helper_count, helper_indices, rotation_epoch
from sim.model import full_shapes, helper_shapes, local_shapes
from sim.tiers import layer_widths
from sim.wire import PREFIX, Payload, encode_payload, resealed

MANIFEST = "manifest.json"
# The shrunk input of each planted bug's op that kills it (scripts/pin_killers.py writes it).
KILLERS = Path(__file__).resolve().parent.parent / "vectors" / "killers.json"
# Waiting for an implementation's hello is a hang guard, not the per-case timeout: starting one
# (an interpreter importing torch, a Rust binary loading libtorch) takes seconds on a busy machine.
STARTUP_S = 120.0
EXACT = {"rtol": 0.0, "atol": 0.0}
FLOAT = {"rtol": 1e-5, "atol": 1e-6}   # float32 inputs; another implementation's DCT may round differently


class VectorsError(SimError):
    """A vectors directory or an implementation's command that cannot be used at all."""


def _generator(seed: int, op: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{op}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _int(g: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _choice(g: torch.Generator, options):
    return options[_int(g, 0, len(options) - 1)]


# --- the cases of each operation ---------------------------------------------------
# Each returns (inputs, flags, strategy) for case `index`; `g` is that case's generator.

LAYER = "model.layers.{}.mlp.{}.{}"
NAMES = [LAYER.format(0, "gate_proj", "weight"), LAYER.format(3, "up_proj", "weight"),
         LAYER.format(1, "down_proj", "weight"), LAYER.format(2, "gate_proj", "bias"), LAYER.format(0, "up_proj", "bias")]
NEAR_MISSES = ["model.layers.0.mlp.down_proj.bias", "model.layers.0.self_attn.down_proj_bias",
               "model.layers.0.mlp.gate_projection.weight", "model.layers.0.mlp.up_proj.weights",
               "model.layers.0.mlp_.up_proj.weight", "model.layers.0.self_attn.o_proj.weight", "model.embed_tokens.weight",
               "lm_head.weight", "mlp.up_proj.weight", "model.layers.0.mlp.up_proj", "", "model.norm.weight"]


def _prefix_dim(g, index):
    names = NAMES + NEAR_MISSES
    name = names[index % len(names)]
    return {"name": name}, ["near_miss"] if name in NEAR_MISSES else [], "real and near-miss parameter names"


def _align_prefix_grad(g, index):
    name = _choice(g, NAMES)
    dim = 1 if "down_proj.weight" in name else 0
    full = _choice(g, [8, 16, 24])
    other = _int(g, 1, 6)
    narrow = full >> _int(g, 0, 2)
    kind = index % 4
    source = [narrow, other] if "weight" in name else [narrow]
    target = [full, other] if "weight" in name else [full]
    if dim == 1:
        source, target = source[::-1], target[::-1]
    flags = []
    if kind == 1:   # slicing: the full gradient brought to a narrow shape
        source, target = target, source
    elif kind == 2:   # a shape that differs off the prefix axis: rejected
        target = list(target)
        if len(target) == 2:
            target[1 - dim] += 1
            flags.append("invalid")
    return {"name": name, "grad": _randn(g, *source), "target_shape": list(target)}, flags, "expand, slice, mismatch"


def _align_sparse_grad(g, index):
    """A helper slab: values of some suffix neurons, scattered into the full shape."""
    name = _choice(g, NAMES[:3])
    dim = 1 if "down_proj" in name else 0
    full, other = _choice(g, [8, 16]), _int(g, 1, 5)
    count = _int(g, 0, full // 2)
    indices = (full - 1 - torch.randperm(full // 2, generator=g)[:count]).sort().values
    flags = []
    if index % 4 == 3 and count:   # a neuron past the full width, or listed twice: refused
        indices = indices.clone()
        indices[-1] = full if index % 8 == 3 else indices[0]
        flags.append("invalid")
    shape = [count, other] if dim == 0 else [other, count]
    target = [full, other] if dim == 0 else [other, full]
    return ({"name": name, "values": _randn(g, *shape), "indices": indices.long(), "target_shape": target}, flags,
            "sorted suffix neurons; out of range or repeated ones")


def _pairs(x: torch.Tensor, chunk: int, k: int, zero_blocks: str = "absent") -> dict:
    sparse = compress(x, chunk, k, zero_blocks=zero_blocks)
    return {"indices": sparse.indices.long(), "values": sparse.values}


def _batch_decompress(g, index):
    """Homogeneous payloads of one grid: every peer's pairs, one scatter-mean, one decode.
    Some peers' tensors are half zero: their all-zero blocks go out as absent slots (matsim)
    or as zeros that count in the mean (Psyche's reading)."""
    shape, chunk, k = _shape(g), _choice(g, [4, 8]), _int(g, 1, 4)
    xs = [_randn(g, *shape) for _ in range(_int(g, 1, 4))]
    flags = []
    if index % 3 == 1:
        xs[0].view(-1)[: xs[0].numel() // 2] = 0
        flags.append("absent_slot")
    inputs = {"chunk": chunk, "shape": list(shape), "payloads": [_pairs(x, chunk, k) for x in xs]}
    psyche = {**inputs, "payloads": [_pairs(x, chunk, k, "sent") for x in xs]}
    return inputs, flags, "1-4 peers' top-k of random tensors, some half zero", psyche


def _chunk_size(g, index):
    n, chunk = _int(g, 1, 5000), _int(g, 1, 128)
    return {"n": n, "chunk": chunk}, ["edge"] if n < chunk or n % chunk else [], "n in [1, 5000], chunk in [1, 128]"


def _shape(g):
    if _int(g, 0, 3) == 0:
        return (_int(g, 1, 40),)
    return (_int(g, 1, 40), _int(g, 1, 40))


def _dct_encode(g, index):
    return {"x": _randn(g, *_shape(g)), "chunk": _choice(g, [4, 8, 16])}, [], "random shapes and chunks"


def _dct_decode(g, index):
    shape, chunk = _shape(g), _choice(g, [4, 8, 16])
    grid = ChunkGrid.of(shape, chunk)
    return ({"coeffs": _randn(g, *grid.blocks, grid.block_numel), "shape": list(shape), "chunk": chunk}, [],
            "random coefficients per block")


def _compress(g, index):
    x, flags = _randn(g, *_shape(g)), []
    if index % 3 == 1:   # some blocks all zero (embedding rows of tokens a batch lacks), or all of them
        x.view(-1)[: x.numel() if index % 6 == 4 else x.numel() // 2] = 0
        flags.append("absent_slot")
    zero_blocks = "sent" if index % 6 == 1 else "absent"
    chunk, topk = _choice(g, [4, 8]), _int(g, 1, 6)
    if _near_tie(x, chunk, topk):
        flags.append("tie")
    inputs = {"x": x, "chunk": chunk, "topk": topk, "zero_blocks": zero_blocks}
    return inputs, flags, "random values, half-zero tensors", {**inputs, "zero_blocks": "sent"}


TIE = 1e-4   # relative gap between the k-th and (k+1)-th magnitudes under which another DCT may choose otherwise


def _near_tie(x: torch.Tensor, chunk: int, topk: int) -> bool:
    """Whether some block's k-th and (k+1)-th largest nonzero magnitudes are within TIE: a
    case whose top-k an implementation rounding differently may choose otherwise (flagged)."""
    grid = ChunkGrid.of(tuple(x.shape), chunk)
    if topk >= grid.block_numel:
        return False
    mags = grid.encode(x.double()).abs().sort(dim=-1, descending=True).values
    kth, next_ = mags[..., topk - 1], mags[..., topk]
    return bool(((kth - next_ <= TIE * kth) & (next_ > 0)).any())


def _quantize_1bit(g, index):
    shape, chunk, k = _shape(g), _choice(g, [4, 8]), _int(g, 1, 4)
    x = _randn(g, *shape)
    zero_blocks = "sent" if index % 2 else "absent"
    if index % 4 in (1, 2):
        x.view(-1)[: x.numel() // 2] = 0
    sparse = compress(x, chunk, k, zero_blocks=zero_blocks)
    flags = ["absent_slot"] if bool((sparse.values == 0).any()) else []
    inputs = {"indices": sparse.indices.long(), "values": sparse.values, "shape": list(shape), "chunk": chunk,
              "zero_blocks": zero_blocks}
    return inputs, flags, "compressed random tensors, some with zero blocks", {**inputs, "zero_blocks": "sent"}


def _error_feedback(g, index):
    shape, steps = _shape(g), _int(g, 2, 4)
    return ({"grads": _randn(g, steps, *shape), "lrs": [0.1 * _int(g, 1, 3) for _ in range(steps)],
             "chunk": _choice(g, [4, 8]), "topk": _int(g, 1, 4), "decay": _choice(g, [0.9, 0.999]),
             "quantize_1bit": bool(index % 2), "zero_blocks": "absent"}, [], "a sequence of 2-4 steps")


TINY_NAMES = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "model.norm.weight")


def _aggregate(g, index):
    model = load_config("tiny").model
    chunk, peers, topk = 8, _int(g, 1, 4), _int(g, 1, 4)   # one k for the run, as one config sets it
    semantics = ("coeff", "peer", "region")[index % 3]
    receiver = {name: list(full_shapes(model)[name]) for name in TINY_NAMES}
    payloads, psyche_payloads, flags = [], [], ["mixed_tiers"]
    for peer in range(peers):
        tier = _int(g, 0, 2)
        shapes = local_shapes(model, tier)
        params, psyche_params = {}, {}
        for name in TINY_NAMES:
            x = _randn(g, *shapes[name])
            if name.endswith("norm.weight") and _int(g, 0, 2) == 0:
                x.zero_()   # an all-zero block: the absent slot
                flags.append("absent_slot")
            params[name] = {**_pairs(x, chunk, topk), "shape": list(shapes[name])}
            psyche_params[name] = {**_pairs(x, chunk, topk, "sent"), "shape": list(shapes[name])}
        tiers = [tier] * model.num_hidden_layers
        payloads.append({"tiers": tiers, "params": params})
        psyche_payloads.append({"tiers": tiers, "params": psyche_params})
    inputs = {"chunk": chunk, "quantized": False, "semantics": semantics, "receiver_shapes": receiver,
              "payloads": payloads}
    # Psyche: zero blocks sent; one shape for all: the per-coefficient mean (batch_decompress),
    # else its heterogeneous path (decode each, align, sum, divide by the peers).
    homogeneous = all(p["params"][n]["shape"] == receiver[n] for p in payloads for n in TINY_NAMES)
    psyche = {**inputs, "payloads": psyche_payloads, "semantics": "coeff" if homogeneous else "peer"}
    return inputs, sorted(set(flags)), "tiny's MLP and a norm, 1-4 peers at tiers 0-2", psyche


def _apply_update(g, index):
    params = {"w": _randn(g, 4, 6), "b": _randn(g, 6)}
    updates = {name: _randn(g, *p.shape) for name, p in params.items()}
    return ({"params": params, "updates": updates, "lr": 0.01 * _int(g, 1, 5), "rule": ("sign", "sgd")[index % 2],
             "weight_decay": _choice(g, [0.0, 0.1])}, [], "sign-SGD and SGD, with and without weight decay")


SCHEMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "rope_theta", "rms_norm_eps",
                 "max_position_embeddings", "vocab_size", "tie_word_embeddings")


def _schema_hash(g, index):
    """tiny's config.json: as it is; as its tier-1 and tier-2 exports write it (the same hash
    as the full model); with metadata that contradicts its width (refused); with one hashed
    field changed (another hash)."""
    base = load_config("tiny").model
    kind = index % (len(SCHEMA_FIELDS) + 4)
    if kind in (1, 2):
        return {"config": tier_config(base, kind)}, ["sliced"], f"the config.json of tiny's tier-{kind} export"
    if kind == 3:
        hf = {**tier_config(base, 1), "intermediate_size": base.intermediate_size}
        return {"config": hf}, ["sliced"], "a tier-1 export's config.json whose width contradicts its tier"
    changes = {}
    if kind:
        name = SCHEMA_FIELDS[kind - 4]
        value = getattr(base, name)
        changes[name] = (not value) if isinstance(value, bool) else value * 2
    hf = ModelConfig(**{**base.__dict__, **changes}).to_hf_dict()
    return {"config": hf}, [f"changes:{name}" for name in changes], "tiny's config, one hashed field changed"


def _helper_indices(g, index):
    full = _choice(g, [64, 256, 1024])
    width = full >> _int(g, 1, 3)
    inputs = {"seed": _int(g, 0, 2**31 - 1), "round": _int(g, 0, 40), "layer": _int(g, 0, 7), "width": width,
              "full": full, "fraction": _choice(g, [0.0, 0.1, 0.25, 0.5, 1.0]), "rotation_interval": _int(g, 1, 8)}
    return inputs, [], "per (seed, layer, epoch)", inputs


def _helper_indices_over_the_whole_width(i):
    """Psyche's reading: the same count drawn from [0, I), the peer's own prefix included
    (and past a tier-1+ peer's width). matsim's permutation stands in for Psyche's generator:
    what the reading shows is the range, not Psyche's exact draw."""
    return {"indices": epoch_window(_suffix_order(i["seed"], i["layer"], 0, i["full"]),
                                    helper_count(i["width"], i["full"], i["fraction"]),
                                    rotation_epoch(i["round"], i["rotation_interval"]))}


# --- frames: payloads as bytes on the wire (sim/wire.py) ---------------------------

FRAME_ROUND = 3


def _run_inputs(g, quantized: bool) -> tuple[ModelConfig, dict]:
    model = load_config("tiny").model
    return model, {"config": model.to_hf_dict(), "chunk": 8, "topk": _int(g, 1, 3), "quantized": quantized}


def _payload(g, model: ModelConfig, run: dict, peer: int, helpers: bool, round_: int = FRAME_ROUND) -> Payload:
    """A peer's payload at random per-layer tiers: every parameter compressed (a norm sometimes
    all zero: absent slots), in helper mode with slabs at its helper neurons."""
    tiers = tuple(_int(g, 0, 2) for _ in range(model.num_hidden_layers))

    def sparse(shape, zero=False):
        x = torch.zeros(shape) if zero else _randn(g, *shape)
        packed = compress(x, run["chunk"], run["topk"])
        return quantize_1bit(packed) if run["quantized"] else packed
    params = {name: sparse(shape, name.endswith("norm.weight") and _int(g, 0, 3) == 0)
              for name, shape in local_shapes(model, tiers).items()}
    payload = Payload(peer, round_, tiers, params, run["quantized"])
    if helpers:
        widths = layer_widths(model.intermediate_size, tiers, model.num_hidden_layers)
        for layer, width in enumerate(widths):
            neurons = helper_indices(_int(g, 0, 1000), round_, layer, width, model.intermediate_size, 0.5, 1)
            if neurons.numel():
                payload.helper_neurons[layer] = neurons
        counts = {layer: n.numel() for layer, n in payload.helper_neurons.items()}
        payload.helper_params.update({name: sparse(shape) for name, shape in helper_shapes(model, counts).items()})
    return payload


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _flawed(g, flaw: str, model: ModelConfig, run: dict, payload: Payload) -> bytes:
    """`payload`'s frame with one flaw of FRAME_FLAWS."""
    if flaw == "non_finite":
        name = sorted(payload.params)[_int(g, 0, len(payload.params) - 1)]
        payload.params[name].values.view(-1)[0] = float("nan")
    elif flaw == "bad_tier":
        payload.tiers = (model.max_tier + 1,) * len(payload.tiers)
    elif flaw == "unknown_parameter":
        payload.params["model.layers.0.mlp.gate_projection.weight"] = payload.params["model.norm.weight"]
    elif flaw == "helper_in_the_prefix":
        layer = next(iter(payload.helper_neurons))
        payload.helper_neurons[layer] = payload.helper_neurons[layer] - payload.helper_neurons[layer].min()
    elif flaw == "stale_round":
        payload.round = FRAME_ROUND + 1
    data = encode_payload(payload, run["chunk"])
    if flaw == "flipped_byte":
        flipped = bytearray(data)
        flipped[_int(g, 0, len(data) - 1)] ^= 1 << _int(g, 0, 7)
        return bytes(flipped)
    if flaw == "truncated":
        return data[:_int(g, 0, len(data) - 1)]
    if flaw == "bad_magic":
        return resealed(data, lambda body: bytearray(b"XSIM") + body[4:])
    if flaw == "bad_version":
        return resealed(data, lambda body: body[:4] + PREFIX.pack(b"MSIM", 99, 0)[4:6] + body[6:])
    return data


# Each flaw is the one the case is named after; the rejection's reason is matsim's (`expected`).
FRAME_FLAWS = ("flipped_byte", "truncated", "bad_magic", "bad_version", "non_finite", "bad_tier",
               "unknown_parameter", "helper_in_the_prefix")


def _decode_frame(g, index):
    """Valid frames (some quantized, some with helper slabs) and frames with one flaw each."""
    flaw = None if index % 3 == 0 else FRAME_FLAWS[(index - index // 3 - 1) % len(FRAME_FLAWS)]
    quantized = bool(index % 2) and flaw != "non_finite"   # 1-bit signs cannot carry NaN
    model, run = _run_inputs(g, quantized)
    payload = _payload(g, model, run, peer=_int(g, 0, 9), helpers=flaw == "helper_in_the_prefix" or _int(g, 0, 1) == 1)
    if flaw == "helper_in_the_prefix" and not payload.helper_neurons:
        flaw = "flipped_byte"
    data = _flawed(g, flaw, model, run, payload) if flaw else encode_payload(payload, run["chunk"])
    flags = [f"flaw:{flaw}"] if flaw else []
    flags += ["helpers"] if payload.helper_params else []
    return {**run, "frame": _bytes(data)}, flags, "tiny's payloads at random tiers, valid or with one flaw"


RECEIVE_FLAWS = ("duplicate", "stale_round", "flipped_byte", "non_finite", "bad_tier")


def _receive(g, index):
    """One round at one receiver: 1-4 peers at mixed tiers, some with helper slabs, and in
    most cases one more frame that must be rejected (with its reason) and change nothing else."""
    semantics = ("coeff", "peer", "region")[index % 3]
    flaw = None if index % 6 == 0 else RECEIVE_FLAWS[index % len(RECEIVE_FLAWS)]
    quantized = bool(index % 4 == 1) and flaw != "non_finite"
    model, run = _run_inputs(g, quantized)
    helpers = index % 2 == 1
    payloads = [_payload(g, model, run, peer, helpers and _int(g, 0, 1) == 1) for peer in range(_int(g, 1, 4))]
    frames = [encode_payload(p, run["chunk"]) for p in payloads]
    if flaw == "duplicate":
        frames.append(frames[_int(g, 0, len(frames) - 1)])
    elif flaw:
        frames.insert(_int(g, 0, len(frames)), _flawed(g, flaw, model, run, _payload(g, model, run, 9, False)))
    receiver = [_int(g, 0, 2) for _ in range(model.num_hidden_layers)]
    flags = ["mixed_tiers"] + ([f"flaw:{flaw}"] if flaw else []) + \
        (["helpers"] if any(p.helper_params for p in payloads) else [])
    return ({**run, "semantics": semantics, "round": FRAME_ROUND, "receiver_tiers": receiver,
             "frames": [_bytes(f) for f in frames]}, flags, "tiny, 1-4 peers, one flawed frame or none")


def _decoded(value):
    """A value as the protocol encodes it, its tensors ({"dtype", "shape", "data"}) rebuilt."""
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"}:
            return torch.tensor(value["data"], dtype=getattr(torch, value["dtype"])).reshape(value["shape"])
        return {k: _decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def _killers() -> list[tuple[str, dict, list, str]]:
    """vectors/killers.json as cases: each planted bug's shrunk killing input of its op."""
    if not KILLERS.is_file():
        return []
    return [(k["op"], _decoded(k["inputs"]), [*k.get("flags", []), f"kills:{k['bug']}"],
             f"hypothesis.find: the shrunk {k['op']} input on which planted bug {k['bug']} answers otherwise")
            for k in json.loads(KILLERS.read_text())]


def _pinned_alignments() -> list[tuple[str, dict, list, str]]:
    """The chapter's alignment cases (sim.align.CHAPTER_CASES, pinned as @example in the
    properties) as align_prefix_grad cases: the narrow gradient expanded, and the full one sliced."""
    g, cases = _generator(0, "pinned", 0), []
    for name, full, local, _ in sorted(CHAPTER_CASES):
        cases.append(("align_prefix_grad", {"name": name, "grad": _randn(g, *local), "target_shape": list(full)},
                      ["pinned"], "@example of properties/test_align.py: expand"))
        cases.append(("align_prefix_grad", {"name": name, "grad": _randn(g, *full), "target_shape": list(local)},
                      ["pinned"], "@example of properties/test_align.py: slice"))
    return cases


CASES: dict[str, Callable] = {"prefix_dim": _prefix_dim, "align_prefix_grad": _align_prefix_grad,
                              "align_sparse_grad": _align_sparse_grad, "batch_decompress": _batch_decompress,
                              "chunk_size": _chunk_size, "dct_encode": _dct_encode, "dct_decode": _dct_decode,
                              "compress": _compress, "quantize_1bit": _quantize_1bit, "error_feedback": _error_feedback,
                              "aggregate": _aggregate, "apply_update": _apply_update, "schema_hash": _schema_hash,
                              "helper_indices": _helper_indices, "decode_frame": _decode_frame, "receive": _receive}
# How Psyche's code computes an op where it is known to differ from matsim (the cases give
# Psyche's inputs): by default the op itself on those inputs.
READINGS: dict[str, Callable] = {"helper_indices": _helper_indices_over_the_whole_width}
# Ops with float outputs, compared within FLOAT (integer outputs, such as indices, always exactly).
FLOAT_OPS = {"dct_encode", "dct_decode", "compress", "quantize_1bit", "error_feedback", "aggregate", "apply_update",
             "align_prefix_grad", "align_sparse_grad", "batch_decompress", "decode_frame", "receive"}
assert set(CASES) == set(OPS)


# --- export -----------------------------------------------------------------------

def _stored(value, case_id: str, path: str, tensors: dict):
    """`value` with every tensor moved into `tensors` and replaced by its reference."""
    if isinstance(value, torch.Tensor):
        key = f"{case_id}/{path}"
        tensors[key] = value.detach().contiguous().clone()
        return {"tensor": {"key": key}}
    if isinstance(value, dict):
        return {k: _stored(v, case_id, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stored(v, case_id, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _with_file(value, file: str):
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            return {"tensor": {"file": file, "key": value["tensor"]["key"]}}
        return {k: _with_file(v, file) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_file(v, file) for v in value]
    return value


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _case(case_id: str, op: str, made: tuple, seed: int, index: int, tensors: dict) -> dict:
    """One case: matsim's outputs (or error) for its inputs and, where Psyche's reading of the
    same data differs, Psyche's outputs too (flag psyche_divergent)."""
    inputs, flags, strategy, *psyche_inputs = made
    flags, file = set(flags), f"{op}.safetensors"
    try:
        outputs = OPS[op](inputs)
        expected = {"outputs": _stored(outputs, case_id, "out", tensors)}
    except SimError as err:
        outputs, expected = None, {"error": error_kind(err)}
        flags.add("invalid")
    if outputs is not None and psyche_inputs:
        psyche = READINGS.get(op, OPS[op])(psyche_inputs[0])
        if not _same(outputs, psyche):
            expected["psyche"] = {"outputs": _stored(psyche, case_id, "psyche", tensors)}
            flags.add("psyche_divergent")
    return {"id": case_id, "op": op, "inputs": _with_file(_stored(inputs, case_id, "in", tensors), file),
            "expected": _with_file(expected, file), "tolerance": FLOAT if op in FLOAT_OPS else EXACT,
            "flags": sorted(flags), "made": {"strategy": strategy, "seed": seed, "index": index}}


def export(out: str | Path, seed: int = 0, cases_per_op: int = 16) -> Path:
    """Write the vectors to `out`, atomically (staged beside it, then renamed)."""
    if cases_per_op < 1:
        raise VectorsError(f"--cases-per-op {cases_per_op} is invalid: expected an integer >= 1")
    out = Path(out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest = {"format": FORMAT, "version": VERSION, "seed": seed, "cases_per_op": cases_per_op, "ops": {}}
    pinned, killers = _pinned_alignments(), _killers()
    for op, make in CASES.items():
        count = max(cases_per_op, len(NAMES) + len(NEAR_MISSES)) if op == "prefix_dim" else cases_per_op
        cases, tensors = [], {}
        for index in range(count):
            cases.append(_case(f"{op}-{index:04d}", op, make(_generator(seed, op, index), index), seed, index, tensors))
        for kind, extra in (("pinned", pinned), ("kills", killers)):
            for index, (_, *made) in enumerate(c for c in extra if c[0] == op):
                cases.append(_case(f"{op}-{kind}-{index:02d}", op, made, seed, index, tensors))
        (staging / f"{op}.safetensors").write_bytes(safetensors.torch.save(dict(sorted(tensors.items()))))
        (staging / f"{op}.json").write_text(json.dumps({"op": op, "cases": cases}, indent=1, sort_keys=True) + "\n")
        manifest["ops"][op] = {"file": f"{op}.json", "tensors": f"{op}.safetensors", "cases": len(cases)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


# --- reading ----------------------------------------------------------------------

def load(directory: str | Path, only: str | None = None) -> list[dict]:
    """Every case of a vectors directory (of op `only`), its files checked first."""
    return _load(Path(directory), only)[0]


def _load(directory: Path, only: str | None) -> tuple[list[dict], dict]:
    """(the cases, their safetensors files by name as `resolve` caches them): each file is
    read once, to check it and to serve every case that refers to it."""
    if not (directory / MANIFEST).is_file():
        raise VectorsError(f"vectors directory {str(directory)!r} has no {MANIFEST}: give a directory that "
                           f"`matsim vectors export` wrote")
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VectorsError(f"{directory / MANIFEST} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise VectorsError(f"{directory / MANIFEST}: format {manifest.get('format')!r} version "
                           f"{manifest.get('version')!r} is not supported: this matsim reads {FORMAT} version {VERSION}")
    ops = manifest.get("ops", {})
    if only is not None and only not in ops:
        raise VectorsError(f"--only {only!r} is not an op of {directory}: valid are {', '.join(sorted(ops))}")
    cases, tensors = [], {}
    for op, entry in sorted(ops.items()):
        if only is not None and op != only:
            continue
        try:
            tensors[entry["tensors"]] = safetensors.torch.load_file(directory / entry["tensors"])
            cases += json.loads((directory / entry["file"]).read_text())["cases"]
        except (OSError, ValueError, KeyError, safetensors.SafetensorError) as err:
            raise VectorsError(f"{directory}: the files of op {op!r} cannot be read ({type(err).__name__}: {err})"
                               ) from None
    return cases, tensors


# --- check ------------------------------------------------------------------------

class AdapterTrouble(Exception):
    """What went wrong with one request: the case fails with this reason."""


class Adapter:
    """The implementation under test, as a subprocess speaking the protocol."""

    def __init__(self, command: str, directory: Path, timeout_s: float):
        self.command, self.directory, self.timeout_s = command, directory, timeout_s
        self.process, self.lines = None, None
        self.ops = self.start()

    def start(self) -> set[str]:
        try:
            argv = shlex.split(self.command)
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except (OSError, ValueError) as err:
            raise VectorsError(f"--impl {self.command!r} cannot be started ({type(err).__name__}: {err})") from None
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True).start()
        try:
            hello = self.ask({"hello": {"format": FORMAT, "version": VERSION, "dir": str(self.directory.resolve())}},
                             max(self.timeout_s, STARTUP_S))
        except AdapterTrouble as trouble:
            self.stop()
            raise VectorsError(f"--impl {self.command!r} did not answer the hello: {trouble}") from None
        return set(hello.get("hello", {}).get("ops", []))

    @staticmethod
    def _read(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)   # end of output: the process exited

    def ask(self, request: dict, timeout_s: float | None = None) -> dict:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise AdapterTrouble(f"the implementation exited (status {self.process.poll()})") from None
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AdapterTrouble(f"no answer within {timeout_s:g} s") from None
        if line is None:
            self.process.wait(timeout=timeout_s)
            raise AdapterTrouble(f"the implementation exited (status {self.process.poll()})")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise AdapterTrouble(f"the answer is not JSON: {line.strip()[:80]!r}") from None
        if not isinstance(reply, dict):
            raise AdapterTrouble(f"the answer is not a JSON object: {line.strip()[:80]!r}")
        return reply

    def restart(self) -> None:
        self.stop()
        self.ops = self.start()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
        if self.process:
            self.process.wait()


def compare(expected, got, tolerance: dict, path: str = "") -> str | None:
    """Why `got` is not `expected` within `tolerance`, or None when it is."""
    if isinstance(expected, torch.Tensor):
        if not (isinstance(got, dict) and {"shape", "data"} <= set(got)):
            return f"{path}: expected a tensor, got {str(got)[:60]}"
        if list(got["shape"]) != list(expected.shape) or len(got["data"]) != expected.numel():
            return f"{path}: shape {got['shape']}, expected {list(expected.shape)}"
        try:
            actual = torch.tensor(got["data"], dtype=torch.float64).reshape(expected.shape)
        except (TypeError, ValueError, RuntimeError):
            return f"{path}: data is not a list of numbers"
        want = expected.double()
        if expected.dtype.is_floating_point:
            if not torch.allclose(actual, want, rtol=tolerance["rtol"], atol=tolerance["atol"], equal_nan=True):
                worst = (actual - want).abs().max().item()
                return f"{path}: off by up to {worst:.3g} (rtol {tolerance['rtol']:g}, atol {tolerance['atol']:g})"
        elif not torch.equal(actual, want):
            return f"{path}: {int((actual != want).sum())} of {want.numel()} integers differ"
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return f"{path}: keys {sorted(got) if isinstance(got, dict) else type(got).__name__}, expected {sorted(expected)}"
        for key in expected:
            why = compare(expected[key], got[key], tolerance, f"{path}/{key}")
            if why:
                return why
        return None
    if isinstance(expected, float):
        ok = isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=tolerance["rtol"],
                                                            abs_tol=tolerance["atol"])
        return None if ok else f"{path}: {got!r}, expected {expected!r}"
    return None if got == expected else f"{path}: {str(got)[:60]}, expected {str(expected)[:60]}"


@dataclass
class Result:
    case: str
    op: str
    status: str           # pass, fail, error (the adapter misbehaved), skipped (op not implemented)
    reason: str = ""
    flags: list = field(default_factory=list)
    other_reading: bool = False   # a psyche_divergent case failed, and the answer is the other reading's


READINGS_NAMES = ("matsim", "psyche")


def check(directory: str | Path, command: str, only: str | None = None, fail_fast: bool = False,
          timeout_s: float = 30.0, on_result: Callable[[Result], None] | None = None,
          reading: str = "matsim") -> list[Result]:
    """Every case of `directory` (of op `only`) run by the implementation `command`; a
    psyche_divergent case expects `reading`'s outputs."""
    if reading not in READINGS_NAMES:
        raise VectorsError(f"--reading {reading!r} is unknown: valid are {', '.join(READINGS_NAMES)}")
    directory = Path(directory)
    cases, tensors = _load(directory, only)
    adapter, results = Adapter(command, directory, timeout_s), []
    try:
        for case in cases:
            result = run_case(adapter, case, directory, tensors, reading)
            results.append(result)
            if on_result:
                on_result(result)
            if fail_fast and result.status in ("fail", "error"):
                break
            if result.status == "error":   # its output is out of step (or it is gone): start it afresh
                adapter.restart()
    finally:
        adapter.stop()
    return results


def run_case(adapter: Adapter, case: dict, directory: Path, tensors: dict | None = None,
             reading: str = "matsim") -> Result:
    """One case through `adapter`; `tensors` caches the vectors' safetensors files by name. A
    psyche_divergent case is held to `reading`; a failure that is the other reading says so."""
    op, flags = case["op"], case.get("flags", [])
    if op not in adapter.ops:
        return Result(case["id"], op, "skipped", "op not implemented", flags)
    started = time.perf_counter()
    try:
        reply = adapter.ask({"id": case["id"], "op": op, "inputs": case["inputs"]})
    except AdapterTrouble as trouble:
        return Result(case["id"], op, "error", f"{trouble} ({time.perf_counter() - started:.1f} s)", flags)
    if reply.get("id") != case["id"]:
        return Result(case["id"], op, "error", f"answer for {reply.get('id')!r}, expected {case['id']!r}", flags)
    expected = resolve(case["expected"], directory, {} if tensors is None else tensors)
    if "error" in expected:
        kind = (reply.get("error") or {}).get("kind") if isinstance(reply.get("error"), dict) else None
        if kind == expected["error"]:
            return Result(case["id"], op, "pass", "", flags)
        return Result(case["id"], op, "fail", f"expected error {expected['error']}, got "
                                              f"{kind or 'outputs'}", flags)
    if "error" in reply:
        return Result(case["id"], op, "fail", f"unexpected error {str(reply['error'])[:100]}", flags)
    readings = {"matsim": expected["outputs"], "psyche": expected.get("psyche", {}).get("outputs")}
    other = "psyche" if reading == "matsim" else "matsim"
    want = readings[reading] if readings[reading] is not None else readings["matsim"]
    why = compare(want, reply.get("outputs"), case["tolerance"], "outputs")
    if why is None:
        return Result(case["id"], op, "pass", "", flags)
    if readings["psyche"] is not None and compare(readings[other], reply.get("outputs"), case["tolerance"]) is None:
        return Result(case["id"], op, "fail", f"{why}: the answer is {other}'s reading", flags, other_reading=True)
    return Result(case["id"], op, "fail", why, flags)
