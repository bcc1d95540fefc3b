"""The conformance vectors' cases: per op, a generator drawing one case's inputs from
(seed, op, case index) (`CASES`), Psyche's reading where its code computes an op otherwise
(`READINGS`), and the cases pinned from the properties and the planted bugs' killers."""
import hashlib
import json
from collections.abc import Callable
from importlib import resources

import torch

from sim.align import CHAPTER_CASES
from sim.checkpoint import tier_config
from sim.config import ModelConfig, load_config
from sim.conformance import OPS
from sim.distro import ChunkGrid, compress, quantize_1bit
from sim.helper import _suffix_order, epoch_window, helper_count, helper_indices, rotation_epoch
from sim.model import full_shapes, helper_shapes, local_shapes
from sim.tiers import layer_widths
from sim.wire import PREFIX, Payload, encode_payload, resealed

# The shrunk input of each planted bug's op that kills it (scripts/pin_killers.py writes it).
KILLERS = resources.files("sim.vectors") / "killers.json"


class Draws:
    """What a case draws its inputs from: a seeded torch generator, so an export is a function
    of (seed, op, index) (sim.fuzz draws the same cases from Hypothesis instead)."""

    def __init__(self, seed: int, op: str, index: int):
        digest = hashlib.sha256(f"{seed}/{op}/{index}".encode()).digest()
        self.g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def int(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return int(torch.randint(low, high + 1, (1,), generator=self.g))

    def choice(self, options):
        return options[self.int(0, len(options) - 1)]

    def permutation(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.g)


# --- the cases of each operation ---------------------------------------------------
# Each returns (inputs, flags, strategy[, Psyche's inputs]) for case `index`; `g` is what it draws from.

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
    name = g.choice(NAMES)
    dim = 1 if "down_proj.weight" in name else 0
    full = g.choice([8, 16, 24])
    other = g.int(1, 6)
    narrow = full >> g.int(0, 2)
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
    return {"name": name, "grad": g.randn(*source), "target_shape": list(target)}, flags, "expand, slice, mismatch"


def _align_sparse_grad(g, index):
    """A helper slab: values of some suffix neurons, scattered into the full shape."""
    name = g.choice(NAMES[:3])
    dim = 1 if "down_proj" in name else 0
    full, other = g.choice([8, 16]), g.int(1, 5)
    count = g.int(0, full // 2)
    indices = (full - 1 - g.permutation(full // 2)[:count]).sort().values
    flags = []
    if index % 4 == 3 and count:   # a neuron past the full width, or listed twice: refused
        indices = indices.clone()
        indices[-1] = full if index % 8 == 3 else indices[0]
        flags.append("invalid")
    shape = [count, other] if dim == 0 else [other, count]
    target = [full, other] if dim == 0 else [other, full]
    return ({"name": name, "values": g.randn(*shape), "indices": indices.long(), "target_shape": target}, flags,
            "sorted suffix neurons; out of range or repeated ones")


def _pairs(x: torch.Tensor, chunk: int, k: int) -> dict:
    sparse = compress(x, chunk, k)
    return {"indices": sparse.indices.long(), "values": sparse.values}


def _psyche_pairs(x: torch.Tensor, chunk: int, k: int) -> dict:
    """Psyche's compress (shared/modeling/src/distro.rs): libtorch's topk(k, -1, largest, sorted =
    false) of every block's |DCT coefficients|, their values gathered, exact zeros included where
    chosen (they go out and count); in ascending index order, as every case's pairs are. Which
    of equal magnitudes topk chooses is libtorch's: the cases where that decides are flagged tie."""
    grid = ChunkGrid.of(tuple(x.shape), chunk)
    coeffs = grid.encode(x)
    chosen = coeffs.abs().topk(min(k, grid.block_numel), dim=-1, largest=True, sorted=False).indices.sort(-1).values
    return {"indices": chosen, "values": coeffs.gather(-1, chosen)}


def _psyche_compress(inputs: dict) -> dict:
    return _psyche_pairs(inputs["x"], inputs["chunk"], inputs["topk"])


def _batch_decompress(g, index):
    """Homogeneous payloads of one grid: every peer's pairs, one scatter-mean, one decode.
    Some peers' tensors are half zero: their all-zero blocks go out as absent slots (matsim)
    or as zeros that count in the mean (Psyche's reading)."""
    shape, chunk, k = _shape(g), g.choice([4, 8]), g.int(1, 4)
    xs = [g.randn(*shape) for _ in range(g.int(1, 4))]
    flags = []
    if index % 3 == 1:
        xs[0].view(-1)[: xs[0].numel() // 2] = 0
        flags.append("absent_slot")
    inputs = {"chunk": chunk, "shape": list(shape), "payloads": [_pairs(x, chunk, k) for x in xs]}
    psyche = {**inputs, "payloads": [_psyche_pairs(x, chunk, k) for x in xs]}
    flags += ["tie"] if any(_tied(x, chunk, k) for x in xs) else []
    return inputs, flags, "1-4 peers' top-k of random tensors, some half zero", psyche


def _chunk_size(g, index):
    n, chunk = g.int(1, 5000), g.int(1, 128)
    return {"n": n, "chunk": chunk}, ["edge"] if n < chunk or n % chunk else [], "n in [1, 5000], chunk in [1, 128]"


def _shape(g):
    if g.int(0, 3) == 0:
        return (g.int(1, 40),)
    return (g.int(1, 40), g.int(1, 40))


def _dct_encode(g, index):
    return {"x": g.randn(*_shape(g)), "chunk": g.choice([4, 8, 16])}, [], "random shapes and chunks"


def _dct_decode(g, index):
    shape, chunk = _shape(g), g.choice([4, 8, 16])
    grid = ChunkGrid.of(shape, chunk)
    return ({"coeffs": g.randn(*grid.blocks, grid.block_numel), "shape": list(shape), "chunk": chunk}, [],
            "random coefficients per block")


def _compress(g, index):
    x, flags = g.randn(*_shape(g)), []
    if index % 3 == 1:   # some blocks all zero (embedding rows of tokens a batch lacks), or all of them
        x.view(-1)[: x.numel() if index % 6 == 4 else x.numel() // 2] = 0
        flags.append("absent_slot")
    zero_blocks = "sent" if index % 6 == 1 else "absent"
    chunk, topk = g.choice([4, 8]), g.int(1, 6)
    if _tied(x, chunk, topk):
        flags.append("tie")
    inputs = {"x": x, "chunk": chunk, "topk": topk, "zero_blocks": zero_blocks}
    return inputs, flags, "random values, half-zero tensors", inputs


TIE = 1e-4   # relative gap between the k-th and (k+1)-th magnitudes under which another DCT may choose otherwise


def _tied(x: torch.Tensor, chunk: int, topk: int) -> bool:
    """Whether some block's k-th and (k+1)-th largest magnitudes are equal (an all-zero block's
    are) or within TIE: a case whose top-k another implementation, or another libtorch, may
    choose otherwise among equals (flagged tie)."""
    grid = ChunkGrid.of(tuple(x.shape), chunk)
    if topk >= grid.block_numel:
        return False
    mags = grid.encode(x.double()).abs().sort(dim=-1, descending=True).values
    kth, next_ = mags[..., topk - 1], mags[..., topk]
    return bool((kth - next_ <= TIE * kth).any())


def _quantize_1bit(g, index):
    shape, chunk, k = _shape(g), g.choice([4, 8]), g.int(1, 4)
    x = g.randn(*shape)
    zero_blocks = "sent" if index % 2 else "absent"
    if index % 4 in (1, 2):
        x.view(-1)[: x.numel() // 2] = 0
    sparse = compress(x, chunk, k, zero_blocks=zero_blocks)
    flags = ["absent_slot"] if bool((sparse.values == 0).any()) else []
    inputs = {"indices": sparse.indices.long(), "values": sparse.values, "shape": list(shape), "chunk": chunk,
              "zero_blocks": zero_blocks}
    return inputs, flags, "compressed random tensors, some with zero blocks", {**inputs, "zero_blocks": "sent"}


def _error_feedback(g, index):
    shape, steps = _shape(g), g.int(2, 4)
    return ({"grads": g.randn(steps, *shape), "lrs": [0.1 * g.int(1, 3) for _ in range(steps)],
             "chunk": g.choice([4, 8]), "topk": g.int(1, 4), "decay": g.choice([0.9, 0.999]),
             "quantize_1bit": bool(index % 2), "zero_blocks": "absent"}, [], "a sequence of 2-4 steps")


TINY_NAMES = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "model.norm.weight")


def _aggregate(g, index):
    model = load_config("tiny").model
    chunk, peers, topk = 8, g.int(1, 4), g.int(1, 4)   # one k for the run, as one config sets it
    semantics = ("coeff", "peer", "region")[index % 3]
    receiver = {name: list(full_shapes(model)[name]) for name in TINY_NAMES}
    payloads, psyche_payloads, flags = [], [], []
    for peer in range(peers):
        tier = g.int(0, 2)
        shapes = local_shapes(model, tier)
        params, psyche_params = {}, {}
        for name in TINY_NAMES:
            x = g.randn(*shapes[name])
            if name.endswith("norm.weight") and g.int(0, 2) == 0:
                x.zero_()   # an all-zero block: the absent slot
                flags.append("absent_slot")
            params[name] = {**_pairs(x, chunk, topk), "shape": list(shapes[name])}
            psyche_params[name] = {**_psyche_pairs(x, chunk, topk), "shape": list(shapes[name])}
            flags += ["tie"] if _tied(x, chunk, topk) else []
        tiers = [tier] * model.num_hidden_layers
        payloads.append({"tiers": tiers, "params": params})
        psyche_payloads.append({"tiers": tiers, "params": psyche_params})
    if any(p["params"][n]["shape"] != receiver[n] for p in payloads for n in TINY_NAMES):
        flags.append("mixed_tiers")   # some payload narrower than the receiver
    inputs = {"chunk": chunk, "quantized": False, "semantics": semantics, "receiver_shapes": receiver,
              "payloads": payloads}
    # Psyche: zero blocks sent; one shape for all: the per-coefficient mean (batch_decompress),
    # else its heterogeneous path (decode each, align, sum, divide by the peers).
    homogeneous = all(p["params"][n]["shape"] == receiver[n] for p in payloads for n in TINY_NAMES)
    psyche = {**inputs, "payloads": psyche_payloads, "semantics": "coeff" if homogeneous else "peer"}
    return inputs, sorted(set(flags)), "tiny's MLP and a norm, 1-4 peers at tiers 0-2", psyche


def _apply_update(g, index):
    params = {"w": g.randn(4, 6), "b": g.randn(6)}
    updates = {name: g.randn(*p.shape) for name, p in params.items()}
    rule = ("sign", "sgd", "adamw")[index % 3]
    inputs = {"params": params, "updates": updates, "lr": 0.01 * g.int(1, 5), "rule": rule,
              "weight_decay": g.choice([0.0, 0.1])}
    if rule == "adamw":   # the moments the network carries in, after t earlier steps
        t = g.int(0, 3)
        inputs["moments"] = {name: {"m": 0.1 * g.randn(*p.shape), "v": 0.01 * g.randn(*p.shape).abs(), "t": t}
                             for name, p in params.items()}
    return inputs, [], "sign-SGD, SGD and AdamW (moments in and out), with and without weight decay"


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
    full = g.choice([64, 256, 1024])
    width = full >> g.int(1, 3)
    inputs = {"seed": g.int(0, 2**31 - 1), "round": g.int(0, 40), "layer": g.int(0, 7), "width": width,
              "full": full, "fraction": g.choice([0.0, 0.1, 0.25, 0.5, 1.0]), "rotation_interval": g.int(1, 8)}
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
    return model, {"config": model.to_hf_dict(), "chunk": 8, "topk": g.int(1, 3), "quantized": quantized}


def _payload(g, model: ModelConfig, run: dict, peer: int, helpers: bool, round_: int = FRAME_ROUND) -> Payload:
    """A peer's payload at random per-layer tiers: every parameter compressed (a norm sometimes
    all zero: absent slots), in helper mode with slabs at its helper neurons."""
    tiers = tuple(g.int(0, 2) for _ in range(model.num_hidden_layers))

    def sparse(shape, zero=False):
        x = torch.zeros(shape) if zero else g.randn(*shape)
        packed = compress(x, run["chunk"], run["topk"])
        return quantize_1bit(packed) if run["quantized"] else packed
    params = {name: sparse(shape, name.endswith("norm.weight") and g.int(0, 3) == 0)
              for name, shape in local_shapes(model, tiers).items()}
    payload = Payload(peer, round_, tiers, params, run["quantized"])
    if helpers:
        widths = layer_widths(model.intermediate_size, tiers, model.num_hidden_layers)
        for layer, width in enumerate(widths):
            neurons = helper_indices(g.int(0, 1000), round_, layer, width, model.intermediate_size, 0.5, 1)
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
        name = sorted(payload.params)[g.int(0, len(payload.params) - 1)]
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
        flipped[g.int(0, len(data) - 1)] ^= 1 << g.int(0, 7)
        return bytes(flipped)
    if flaw == "truncated":
        return data[:g.int(0, len(data) - 1)]
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
    payload = _payload(g, model, run, peer=g.int(0, 9), helpers=flaw == "helper_in_the_prefix" or g.int(0, 1) == 1)
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
    payloads = [_payload(g, model, run, peer, helpers and g.int(0, 1) == 1) for peer in range(g.int(1, 4))]
    frames = [encode_payload(p, run["chunk"]) for p in payloads]
    if flaw == "duplicate":
        frames.append(frames[g.int(0, len(frames) - 1)])
    elif flaw:
        frames.insert(g.int(0, len(frames)), _flawed(g, flaw, model, run, _payload(g, model, run, 9, False)))
    receiver = [g.int(0, 2) for _ in range(model.num_hidden_layers)]
    mixed = len({p.tiers for p in payloads} | {tuple(receiver)}) > 1   # a tier that differs, the receiver's too
    flags = (["mixed_tiers"] if mixed else []) + ([f"flaw:{flaw}"] if flaw else []) + \
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
    g, cases = Draws(0, "pinned", 0), []
    for name, full, local, _ in sorted(CHAPTER_CASES):
        cases.append(("align_prefix_grad", {"name": name, "grad": g.randn(*local), "target_shape": list(full)},
                      ["pinned"], "@example of properties/test_align.py: expand"))
        cases.append(("align_prefix_grad", {"name": name, "grad": g.randn(*full), "target_shape": list(local)},
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
READINGS: dict[str, Callable] = {"helper_indices": _helper_indices_over_the_whole_width, "compress": _psyche_compress}
# Ops with float outputs, compared within FLOAT (integer outputs, such as indices, always exactly).
FLOAT_OPS = {"dct_encode", "dct_decode", "compress", "quantize_1bit", "error_feedback", "aggregate", "apply_update",
             "align_prefix_grad", "align_sparse_grad", "batch_decompress", "decode_frame", "receive"}
assert set(CASES) == set(OPS)


