"""Hypothesis strategies: shapes, tiers, per-layer tier maps, parameter names
(valid, non-MLP and near-miss), and small random model configs of both styles."""
import math

import torch
from hypothesis import strategies as st

from sim.align import PREFIX_DIMS
from sim.fuzz import value_strategy, value_vectors
from sim.config import STYLES, ModelConfig
from sim.tiers import max_tier

MLP_MODULES = tuple(PREFIX_DIMS)


@st.composite
def intermediate_sizes(draw, max_halvings: int = 5, max_odd: int = 7) -> int:
    """Base FFN widths odd * 2**k, so the deepest valid tier k varies."""
    return draw(st.integers(1, max_odd).filter(lambda n: n % 2)) << draw(st.integers(0, max_halvings))


@st.composite
def widths_and_tiers(draw, max_halvings: int = 5) -> tuple[int, int]:
    """(I, t) with t a valid tier of I."""
    size = draw(intermediate_sizes(max_halvings))
    return size, draw(st.integers(0, max_tier(size)))


def invalid_tiers(size: int):
    """Tiers that must be rejected for base width `size`."""
    return st.integers(-8, -1) | st.integers(max_tier(size) + 1, max_tier(size) + 8)


def layer_tier_maps(size: int, num_layers: int):
    """Mix'n'Match: one valid tier per layer."""
    return st.lists(st.integers(0, max_tier(size)), min_size=num_layers, max_size=num_layers).map(tuple)


layer_indices = st.integers(0, 63)
prefixes = st.sampled_from(["model.layers.{i}.", "layers.{i}.", "transformer.h.{i}.", "{i}.", ""])  # "": the bare mlp.*


@st.composite
def mlp_names(draw, modules=MLP_MODULES, kinds=("weight",)) -> str:
    prefix = draw(prefixes).format(i=draw(layer_indices))
    return f"{prefix}mlp.{draw(st.sampled_from(modules))}.{draw(st.sampled_from(kinds))}"


@st.composite
def non_mlp_names(draw) -> str:
    """Real names of parameters that no tier slices."""
    layer = draw(layer_indices)
    return draw(st.sampled_from([
        f"model.layers.{layer}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ] + [
        f"model.layers.{layer}.input_layernorm.weight", f"model.layers.{layer}.post_attention_layernorm.weight",
        f"model.layers.{layer}.mlp.down_proj.bias", "model.embed_tokens.weight", "model.norm.weight",
        "lm_head.weight",
    ]))


@st.composite
def near_miss_names(draw) -> str:
    """Names a substring matcher would wrongly accept as MLP weights."""
    layer, module = draw(layer_indices), draw(st.sampled_from(MLP_MODULES))
    return draw(st.sampled_from([
        f"model.layers.{layer}.self_attn.{module}_bias",
        f"model.layers.{layer}.self_attn.{module}.weight",
        f"model.layers.{layer}.mlp.{module.replace('_proj', '_projection')}.weight",
        f"model.layers.{layer}.mlp.{module}_weight",
        f"model.layers.{layer}.mlp_{module}.weight",
        f"model.layers.{layer}.mlp.{module}.weight.extra",
        f"model.layers.{layer}.mlp.{module}",
        f"model.layers.{layer}.MLP.{module}.weight",
        f"model.layers.{layer}.mlp.{module.upper()}.weight",
        f"{module}.weight",
        f"model.layers.{layer}.mlp.{module}.weight_scale",
        f"model.layers.{layer}.mlp.my_{module}.weight",
    ]))


@st.composite
def mlp_grad_cases(draw, max_hidden: int = 24):
    """(name, full_shape, local_shape, prefix_dim) of one MLP weight at a valid tier."""
    name = draw(mlp_names())
    size, tier = draw(widths_and_tiers())
    hidden = draw(st.integers(1, max_hidden))
    dim = PREFIX_DIMS[name.split(".")[-2]]
    full = [size, hidden] if dim == 0 else [hidden, size]
    local = list(full)
    local[dim] = size >> tier
    return name, tuple(full), tuple(local), dim


SEEDS = st.integers(0, 2**31 - 1)
# Values that shrink to a few small numbers: the one definition, which `matsim fuzz` draws too.
small_values = value_strategy()


def tensors(shape, dtype=torch.float32):
    """Tensors of `shape`: zero but for a few small values (`value_vectors`)."""
    return value_vectors(math.prod(shape), dtype).map(lambda x: x.view(*shape) if shape else x.view(()))


@st.composite
def model_configs(draw, styles=STYLES, max_layers: int = 3) -> ModelConfig:
    """Small models of either style: GQA/MQA/MHA, tied or not, with or without MLP bias."""
    head_dim = draw(st.sampled_from([2, 4, 8]))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    return ModelConfig(
        style=draw(st.sampled_from(styles)),
        vocab_size=draw(st.integers(4, 48)),
        hidden_size=heads * head_dim,
        intermediate_size=draw(intermediate_sizes(max_halvings=4, max_odd=5)),
        num_hidden_layers=draw(st.integers(1, max_layers)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32,
        tie_word_embeddings=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
    )


# --- payloads -------------------------------------------------------------

def random_sparse(shape, distro, gen: torch.Generator, values: torch.Tensor | None = None):
    """A Sparse as a peer would send it: distinct random top-k slots per block, `values` (or
    random ones; signs when quantized). Cheaper than compressing a real delta, same wire shape."""
    from sim.distro import ChunkGrid, Sparse
    grid = ChunkGrid.of(shape, distro.compression_chunk)
    k = min(distro.compression_topk, grid.block_numel)
    indices = torch.rand(*grid.blocks, grid.block_numel, generator=gen).argsort(dim=-1)[..., :k]
    values = torch.randn(*grid.blocks, k, generator=gen) if values is None else values.view(*grid.blocks, k)
    return Sparse(grid, indices, values.sign() if distro.quantize_1bit else values)


def random_payload(model_cfg, distro, tiers, peer: int, seed: int, round_: int = 0, values: torch.Tensor | None = None):
    """A payload of random top-k slots (from `seed`) with `values` laid out parameter after
    parameter in name order (or random values)."""
    from sim.model import local_shapes
    from sim.wire import Payload
    gen, params, start = torch.Generator().manual_seed(seed), {}, 0
    for name, shape in local_shapes(model_cfg, tiers).items():
        count = payload_size({name: shape}, distro)
        params[name] = random_sparse(shape, distro, gen, None if values is None else values[start:start + count])
        start += count
    return Payload(peer, round_, tuple(tiers), params, distro.quantize_1bit)


def payload_size(shapes: dict, distro) -> int:
    """The (index, value) pairs of payloads of these shapes."""
    from sim.distro import ChunkGrid
    total = 0
    for shape in shapes.values():
        grid = ChunkGrid.of(shape, distro.compression_chunk)
        total += math.prod(grid.blocks) * min(distro.compression_topk, grid.block_numel)
    return total


@st.composite
def payloads(draw, model_cfg, distro, tiers, peer: int, round_: int = 0):
    """`random_payload` with its values drawn by `value_vectors`: shrinks to a payload whose
    values are zero (under 1-bit: +1) but for a few small ones."""
    from sim.model import local_shapes
    count = payload_size(local_shapes(model_cfg, tiers), distro)
    values = draw(value_vectors(count, base=1.0, values=st.just(-1.0)) if distro.quantize_1bit
                  else value_vectors(count))
    return random_payload(model_cfg, distro, tiers, peer, draw(st.integers(0, 2**20)), round_, values)


@st.composite
def aggregation_cases(draw, min_peers: int = 1, max_peers: int = 6, max_tier_used: int = 2):
    """(model, distro, payloads, receiver tiers) where every tier's DCT blocks line up
    (the base width is a multiple of chunk * 2**max_tier_used), peers of mixed
    per-layer tiers, some peers at tier 0."""
    from sim.config import DistroConfig
    chunk = draw(st.sampled_from([2, 4, 8]))
    deepest = draw(st.integers(0, max_tier_used))
    base = draw(model_configs(max_layers=2))
    size = chunk * (1 << deepest) * draw(st.sampled_from([1, 2, 3]))
    model = ModelConfig(**{**base.__dict__, "intermediate_size": size})
    distro = DistroConfig(compression_chunk=chunk, compression_topk=draw(st.integers(1, 6)),
                          quantize_1bit=draw(st.booleans()))
    tiers = st.lists(st.integers(0, deepest), min_size=model.num_hidden_layers,
                     max_size=model.num_hidden_layers).map(tuple)
    peer_tiers = draw(st.lists(tiers, min_size=min_peers, max_size=max_peers))
    sent = [draw(payloads(model, distro, t, peer=i)) for i, t in enumerate(peer_tiers)]
    return model, distro, sent, draw(tiers)


@st.composite
def helper_cases(draw, max_peers: int = 5):
    """`aggregation_cases` whose peers also send helper slabs: per layer a random sorted
    subset of their suffix [width, I) (possibly empty) and a random Sparse per MLP tensor."""
    from sim.model import helper_shapes
    from sim.tiers import layer_widths
    model, distro, sent, receiver_tiers = draw(aggregation_cases(min_peers=1, max_peers=max_peers))
    for payload in sent:
        if draw(st.booleans()):  # an all-zero block goes out as absent slots: it covers by width, sends nothing
            name = draw(st.sampled_from(sorted(n for n in payload.params if "mlp" in n)))
            sparse = payload.params[name]
            sparse.indices, sparse.values = sparse.indices.contiguous(), sparse.values.contiguous()
            last = math.prod(sparse.grid.blocks) - 1   # the suffix end, where helpers land
            block = draw(st.just(last) | st.integers(0, last))
            sparse.indices.view(-1, sparse.indices.shape[-1])[block] = sparse.grid.block_numel
            sparse.values.view(-1, sparse.values.shape[-1])[block] = 0.0
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
        widths = layer_widths(model.intermediate_size, payload.tiers, model.num_hidden_layers)
        for layer, width in enumerate(widths):
            suffix = list(range(width, model.intermediate_size))
            chosen = draw(st.lists(st.sampled_from(suffix), unique=True)) if suffix else []
            if chosen:
                payload.helper_neurons[layer] = torch.tensor(sorted(chosen))
        counts = {layer: n.numel() for layer, n in payload.helper_neurons.items()}
        slabs = helper_shapes(model, counts)
        values = draw(value_vectors(payload_size(slabs, distro), base=1.0, values=st.just(-1.0))
                      if distro.quantize_1bit else value_vectors(payload_size(slabs, distro)))
        start = 0
        for name, shape in slabs.items():
            count = payload_size({name: shape}, distro)
            payload.helper_params[name] = random_sparse(shape, distro, gen, values[start:start + count])
            start += count
    return model, distro, sent, receiver_tiers
