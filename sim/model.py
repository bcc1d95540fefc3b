"""Llama- and nanogpt-style causal LMs with a MatFormer FFN.

Parameter names are HF's (`model.layers.{i}.mlp.gate_proj.weight`, ...), so a
llama-style state dict loads strict into transformers' LlamaForCausalLM and
gives the same logits. The FFN always stores its full weights; a tier only
changes how much of them the forward pass reads, through `narrow` views along
the prefix dim. No copies are made, so autograd writes gradients into the
prefix and leaves the tail exactly zero.
"""
import functools
import weakref
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sim.align import align_prefix_grad, prefix_dim
from sim.config import ModelConfig
from sim.errors import ConfigError, UnsupportedParameter
from sim.tiers import layer_tiers, layer_widths, width_tier

INIT_STD = 0.02


def default_device() -> torch.device:
    """GPU when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # In fp32 (or wider) then back, as HF's LlamaRMSNorm does, so logits match bit for bit in
        # fp32; a float64 model stays float64 throughout (the exact reference round needs it).
        dtype = x.dtype
        x = x.to(_at_least_fp32(dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal self-attention with grouped KV heads (each KV head serves n_heads / n_kv queries)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MatFormerMLP(nn.Module):
    """SwiGLU (llama) or relu² (nanogpt) FFN that runs on the first `width` neurons,
    plus, in helper mode, the suffix neurons listed in `helpers` (gathered by index)."""

    def __init__(self, cfg: ModelConfig, intermediate_size: int):
        super().__init__()
        self.style = cfg.style
        H, I, bias = cfg.hidden_size, intermediate_size, cfg.mlp_bias
        if cfg.style == "llama":
            self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)
        self.width = I
        self.active = None   # helper mode: prefix then helper neuron indices, else None

    def _select(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        # Views for the prefix (gradient flows only into it); a gather with helpers, whose
        # backward scatters into exactly the active rows.
        return tensor.narrow(dim, 0, self.width) if self.active is None else tensor.index_select(dim, self.active)

    def _rows(self, linear: nn.Linear):
        return self._select(linear.weight, 0), None if linear.bias is None else self._select(linear.bias, 0)

    def forward(self, x):
        up = F.linear(x, *self._rows(self.up_proj))
        if self.style == "llama":
            hidden = F.silu(F.linear(x, *self._rows(self.gate_proj))) * up
        else:
            hidden = F.relu(up).square()
        # down's bias lives on the hidden axis, which no tier slices.
        return F.linear(hidden, self._select(self.down_proj.weight, 1), self.down_proj.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MatFormerMLP(cfg, intermediate_size)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, widths: Sequence[int]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, w) for w in widths)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MatFormerLM(nn.Module):
    """The whole causal LM. `stored_widths` are the FFN widths held in memory per
    layer: the base width for a full model, narrower for a sliced checkpoint."""

    def __init__(self, cfg: ModelConfig, stored_widths: Sequence[int] | None = None):
        super().__init__()
        self.cfg = cfg
        widths = tuple(stored_widths) if stored_widths is not None else (cfg.intermediate_size,) * cfg.num_hidden_layers
        if len(widths) != cfg.num_hidden_layers:
            raise ConfigError(f"got {len(widths)} stored FFN widths {list(widths)} for {cfg.num_hidden_layers} layers")
        self.stored_tiers = tuple(width_tier(cfg.intermediate_size, w) for w in widths)
        self.stored_widths = widths
        self.model = Decoder(cfg, widths)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._tiers = None
        self.set_tiers(self.stored_tiers)

    @property
    def layer_tiers(self) -> tuple[int, ...]:
        return self._tiers

    def set_tiers(self, tiers: int | Sequence[int]) -> "MatFormerLM":
        """Run every layer (int) or each layer (sequence) at the given tier."""
        tiers = layer_tiers(tiers, self.cfg.num_hidden_layers)
        widths = layer_widths(self.cfg.intermediate_size, tiers, self.cfg.num_hidden_layers)
        for layer, (tier, width, stored) in enumerate(zip(tiers, widths, self.stored_widths)):
            if width > stored:
                raise ConfigError(f"layer {layer}: tier {tier} needs FFN width {width} but this model stores only "
                                  f"{stored} neurons (a sliced model): valid tiers here are >= {self.stored_tiers[layer]}")
        for block, width in zip(self.model.layers, widths):
            block.mlp.width, block.mlp.active = width, None
        self._tiers = tiers
        return self

    @property
    def helpers(self) -> dict[int, torch.Tensor]:
        """Layer -> the suffix neurons it trains besides its prefix (helper mode)."""
        return {i: b.mlp.active[b.mlp.width:] for i, b in enumerate(self.model.layers) if b.mlp.active is not None}

    def set_helpers(self, helpers: dict[int, torch.Tensor]) -> "MatFormerLM":
        """Also train these suffix neurons per layer (sorted, in [width, stored width)); the
        next set_tiers clears them. A sliced model stores no suffix: ConfigError."""
        for layer, neurons in helpers.items():
            mlp = self.model.layers[layer].mlp
            if neurons.numel() == 0:
                mlp.active = None
                continue
            stored = self.stored_widths[layer]
            if int(neurons.min()) < mlp.width or int(neurons.max()) >= stored:
                raise ConfigError(f"layer {layer}: helper neurons must lie in the suffix [{mlp.width}, {stored}) this "
                                  f"model stores, got [{int(neurons.min())}, {int(neurons.max())}]")
            prefix = torch.arange(mlp.width, device=neurons.device)
            mlp.active = torch.cat([prefix, neurons.to(torch.int64)]).to(mlp.up_proj.weight.device)
        return self

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.cfg.max_position_embeddings:
            raise ConfigError(f"sequence length {T} exceeds max_position_embeddings {self.cfg.max_position_embeddings}")
        x = self.model.embed_tokens(idx)
        cos, sin = rope_cos_sin(T, self.cfg.head_dim, self.cfg.rope_theta, idx.device, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).to(_at_least_fp32(logits.dtype)), targets.flatten())


def init_weights(model: MatFormerLM, seed: int) -> MatFormerLM:
    """Deterministic init from `seed` alone (never the global RNG): N(0, 0.02) for
    matrices, ones for norms, zeros for biases; drawn on CPU so every device agrees."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                values = torch.ones(p.shape)
            elif name.endswith(".bias"):
                values = torch.zeros(p.shape)
            else:
                values = torch.randn(p.shape, generator=gen) * INIT_STD
            p.copy_(values.to(p.dtype))
    return model


def build_model(cfg: ModelConfig, tiers: int | Sequence[int] = 0, *, seed: int = 0, device=None,
                dtype: torch.dtype = torch.float32, stored_widths: Sequence[int] | None = None) -> MatFormerLM:
    """A deterministically initialized model running at `tiers`."""
    model = init_weights(MatFormerLM(cfg, stored_widths), seed)
    return model.set_tiers(tiers).to(device=device or default_device(), dtype=dtype)


_PARAMETERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def parameters_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's parameters by name, walked once per model: walking a module tree costs more
    than a small model's whole aggregate, and a run updates parameters in place, never
    replacing them (a rejoin or restore brings a new model)."""
    if model not in _PARAMETERS:
        _PARAMETERS[model] = dict(model.named_parameters())
    return _PARAMETERS[model]


def mlp_layer(name: str) -> int:
    """Layer index of an HF-named parameter (`model.layers.{i}....`)."""
    return int(name.split(".")[2])


@functools.lru_cache(maxsize=64)
def _full_shapes(cfg: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        return tuple((name, tuple(p.shape)) for name, p in MatFormerLM(cfg).named_parameters())


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every trainable parameter (tied weights once), built on the meta device."""
    return dict(_full_shapes(cfg))


def local_shapes(cfg: ModelConfig, tiers: int | Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter as a peer at `tiers` holds and sends it."""
    widths = layer_widths(cfg.intermediate_size, tiers, cfg.num_hidden_layers)
    return {name: _ffn_resized(name, shape, widths[mlp_layer(name)]) if is_mlp_sliced(name) else shape
            for name, shape in full_shapes(cfg).items()}


def _ffn_resized(name: str, shape: tuple[int, ...], neurons: int) -> tuple[int, ...]:
    """`shape` with `neurons` along the FFN axis of MLP tensor `name`."""
    resized = list(shape)
    resized[prefix_dim(name)] = neurons
    return tuple(resized)


def local_grads(model: MatFormerLM) -> dict[str, torch.Tensor]:
    """Gradients in the shapes the model's current tiers train (what a peer sends)."""
    shapes = local_shapes(model.cfg, model.layer_tiers)
    return {name: align_prefix_grad(name, p.grad, shapes[name]) if is_mlp_sliced(name) else p.grad
            for name, p in model.named_parameters()}


def helper_grads(model: MatFormerLM) -> dict[str, torch.Tensor]:
    """Helper mode: the gradient of every sliced MLP tensor at its layer's helper neurons
    (rows of gate/up, columns of down), gathered in the order of `model.helpers`."""
    helpers = model.helpers
    return {name: p.grad.index_select(prefix_dim(name), helpers[mlp_layer(name)].to(p.grad.device))
            for name, p in model.named_parameters() if is_mlp_sliced(name) and mlp_layer(name) in helpers}


def helper_shapes(cfg: ModelConfig, counts: dict[int, int]) -> dict[str, tuple[int, ...]]:
    """Shape of every helper slab a peer sends: `counts[layer]` neurons along the FFN axis."""
    return {name: _ffn_resized(name, shape, counts[mlp_layer(name)]) for name, shape in full_shapes(cfg).items()
            if is_mlp_sliced(name) and counts.get(mlp_layer(name), 0) > 0}


def is_mlp_sliced(name: str) -> bool:
    try:
        prefix_dim(name)
        return True
    except UnsupportedParameter:
        return False


def load_prefix(target: MatFormerLM, full_state: dict[str, torch.Tensor]) -> MatFormerLM:
    """Copy the prefix of a (wider) state dict into `target`'s stored shapes."""
    own = target.state_dict()
    sliced = {name: align_prefix_grad(name, full_state[name], own[name].shape) if is_mlp_sliced(name)
              else full_state[name] for name in own}
    target.load_state_dict(sliced, strict=True)
    return target


def param_count(cfg: ModelConfig, tiers: int | Sequence[int] = 0) -> int:
    """Parameters a peer at `tiers` trains (embeddings counted once when tied)."""
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    attention = 2 * H * H + 2 * H * kv
    matrices = 3 if cfg.style == "llama" else 2
    mlp = 0
    for width in layer_widths(cfg.intermediate_size, tiers, L):
        biases = ((matrices - 1) * width + H) if cfg.mlp_bias else 0
        mlp += matrices * H * width + biases
    head = 0 if cfg.tie_word_embeddings else V * H
    return V * H + head + L * (attention + 2 * H) + mlp + H


def random_tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int, device=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen).to(device or default_device())


