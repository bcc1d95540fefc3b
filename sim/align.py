"""Gradient alignment between tiers.

A tier-t peer's MLP tensors are the prefix of the full ones along one axis:
rows of gate_proj/up_proj ([I, H] -> [I>>t, H]) and columns of down_proj
([H, I] -> [H, I>>t]). Alignment moves a tensor between those shapes:
zero-padding at the end to grow, narrowing to the prefix to shrink. Every
other parameter is the same shape on every tier and must never be aligned,
so asking raises UnsupportedParameter instead of guessing.
"""
from collections.abc import Sequence

import torch

from sim.errors import AlignmentError, ShapeMismatch, UnsupportedParameter

# Module name -> the axis that holds the FFN neurons in its [out, in] weight.
PREFIX_DIMS = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}

# The verification chapter's two alignment tests, as (name, full shape, local shape, prefix dim):
# test_align_matformer_prefix_grad_expand_gate ([512, 256] expanded to [1024, 256]) and
# ..._slice_down ([256, 1024] sliced to [256, 512]). properties/test_align.py pins them as
# @example and the conformance vectors export them as `pinned` cases.
CHAPTER_CASES = (("model.layers.0.mlp.gate_proj.weight", (1024, 256), (512, 256), 0),
                 ("model.layers.0.mlp.down_proj.weight", (256, 1024), (256, 512), 1))


def prefix_dim(name: str) -> int:
    """Axis along which parameter `name` is sliced by a tier.

    Matches whole path segments (`...mlp.down_proj.weight`), never substrings:
    `self_attn.down_proj_bias` and `mlp.gate_projection` are not MLP weights.
    gate/up biases slice with their rows; down_proj's bias is never sliced, so
    it has no prefix dimension.
    """
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) >= 3 and parts[-3] == "mlp" and parts[-2] in PREFIX_DIMS and parts[-1] in ("weight", "bias"):
        module, kind = parts[-2], parts[-1]
        if kind == "weight":
            return PREFIX_DIMS[module]
        if module != "down_proj":
            return 0
    raise UnsupportedParameter(
        f"parameter {name!r} has no MatFormer prefix dimension: only mlp.gate_proj and mlp.up_proj "
        f"(weight, bias: rows) and mlp.down_proj.weight (columns) are sliced by tiers")


def _check_target(name: str, target_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(target_shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ShapeMismatch(f"{name}: target shape {list(target_shape)} is invalid: expected positive integers")
    return shape


def alignable(name: str, source_shape: Sequence[int], target_shape: Sequence[int]) -> tuple[int, tuple, tuple]:
    """(prefix dim, source shape, target shape) when a tensor of `source_shape` aligns to
    `target_shape`; else the error align_prefix_grad raises. Shapes only, so a receiver can
    check a payload before it has any tensor to align."""
    dim = prefix_dim(name)
    target = _check_target(name, target_shape)
    source = tuple(source_shape)
    if len(source) != len(target) or any(s != t for d, (s, t) in enumerate(zip(source, target)) if d != dim):
        raise ShapeMismatch(f"{name}: cannot align shape {list(source)} to {list(target)}: only axis {dim} "
                            f"(the FFN axis) may differ between tiers")
    return dim, source, target


def align_prefix_grad(name: str, grad: torch.Tensor, target_shape: Sequence[int]) -> torch.Tensor:
    """Bring `grad` of MLP parameter `name` to `target_shape` along its prefix dim.

    Equal shape: returned unchanged (the same tensor). Smaller along the
    prefix dim: zero-padded at the end, prefix kept. Larger: narrowed to the
    prefix (a view, no copy). Any other axis differing: ShapeMismatch.
    """
    dim, source, target = alignable(name, grad.shape, target_shape)
    if source[dim] == target[dim]:
        return grad
    if source[dim] > target[dim]:
        return grad.narrow(dim, 0, target[dim])
    padded = grad.new_zeros(target)
    padded.narrow(dim, 0, source[dim]).copy_(grad)
    return padded


def align_sparse_grad(name: str, values: torch.Tensor, indices: torch.Tensor,
                      target_shape: Sequence[int]) -> torch.Tensor:
    """Scatter a helper-mode gradient (selected neurons only) into a zero tensor.

    `values` holds the neurons listed in `indices` along the prefix dim (rows
    for gate/up, columns for down). Out-of-range, negative, duplicate or
    non-integer indices raise AlignmentError; nothing is written out of bounds.
    """
    dim = prefix_dim(name)
    target = _check_target(name, target_shape)
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64) or indices.ndim != 1:
        raise AlignmentError(f"{name}: helper indices must be a 1-D int32/int64 tensor, got "
                             f"{getattr(indices, 'dtype', type(indices).__name__)} of shape "
                             f"{list(getattr(indices, 'shape', []))}")
    if len(target) <= dim:
        raise ShapeMismatch(f"{name}: target shape {list(target)} has no axis {dim}")
    expected = list(target)
    expected[dim] = indices.numel()
    if list(values.shape) != expected:
        raise ShapeMismatch(f"{name}: helper values of shape {list(values.shape)} do not fit {indices.numel()} "
                            f"indices into {list(target)}: expected {expected}")
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= target[dim]:
            raise AlignmentError(f"{name}: helper index range [{low}, {high}] is outside [0, {target[dim] - 1}]")
        if torch.unique(indices).numel() != indices.numel():
            raise AlignmentError(f"{name}: helper indices contain duplicates: each neuron may be sent once")
    placed = values.new_zeros(target)
    return placed.index_copy_(dim, indices.to(torch.int64), values)
