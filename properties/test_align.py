"""Alignment laws (sim/align.py), generalizing the chapter's unit tests over
every valid tier, width and MLP name."""
import re

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from properties.strategies import mlp_grad_cases, mlp_names, near_miss_names, non_mlp_names, tensors
from sim.align import CHAPTER_CASES, align_prefix_grad, align_sparse_grad, prefix_dim
from sim.errors import AlignmentError, ShapeMismatch, UnsupportedParameter

@given(mlp_names(kinds=("weight", "bias")))
def test_prefix_dim_is_rows_for_gate_up_and_columns_for_down_weight(name):
    """Catches: down_proj sliced on rows (the wrong axis), or biases given the weight's axis."""
    module, kind = name.split(".")[-2:]
    if module == "down_proj" and kind == "bias":
        with pytest.raises(UnsupportedParameter):
            prefix_dim(name)
    else:
        assert prefix_dim(name) == (1 if module == "down_proj" else 0)


@given(st.one_of(non_mlp_names(), near_miss_names()), st.integers(1, 6), st.integers(1, 6))
def test_every_non_mlp_name_is_rejected_even_at_equal_shape(name, rows, cols):
    """Catches: substring matching (`self_attn.down_proj_bias`, `mlp.gate_projection`), or aligning
    attention/embedding/norm tensors because their shapes happen to match."""
    grad = torch.ones(rows, cols)
    for call in (lambda: prefix_dim(name),
                 lambda: align_prefix_grad(name, grad, grad.shape),
                 lambda: align_sparse_grad(name, grad, torch.arange(rows), grad.shape)):
        with pytest.raises(UnsupportedParameter) as raised:
            call()
        assert repr(name) in str(raised.value)


@given(mlp_grad_cases(), st.data())
@example(CHAPTER_CASES[0], None)
@example(CHAPTER_CASES[1], None)
def test_expanding_keeps_the_prefix_and_zero_fills_the_tail(case, data):
    """Catches: padding at the front, padding the wrong axis, non-zero fill, or a dropped prefix."""
    name, full, local, dim = case
    grad = data.draw(tensors(local)) if data else torch.randn(local)
    expanded = align_prefix_grad(name, grad, full)
    assert tuple(expanded.shape) == full
    assert torch.equal(expanded.narrow(dim, 0, local[dim]), grad)
    assert torch.count_nonzero(expanded.narrow(dim, local[dim], full[dim] - local[dim])) == 0


@given(mlp_grad_cases(), st.data())
@example(CHAPTER_CASES[0], None)
@example(CHAPTER_CASES[1], None)
def test_expand_then_slice_round_trips_exactly(case, data):
    """Catches: any asymmetry between the receiver's expand and the sender's slice."""
    name, full, local, dim = case
    grad = data.draw(tensors(local)) if data else torch.randn(local)
    assert torch.equal(align_prefix_grad(name, align_prefix_grad(name, grad, full), local), grad)


@given(mlp_grad_cases(), st.data())
def test_slicing_takes_exactly_the_prefix(case, data):
    """Catches: slicing the suffix, or slicing the hidden axis of down_proj."""
    name, full, local, dim = case
    grad = data.draw(tensors(full))
    sliced = align_prefix_grad(name, grad, local)
    assert tuple(sliced.shape) == local and torch.equal(sliced, grad.narrow(dim, 0, local[dim]))


@given(mlp_grad_cases())
def test_equal_shape_returns_the_same_tensor(case):
    """Catches: a needless copy on the homogeneous hot path."""
    name, full, _, _ = case
    grad = torch.zeros(full)
    assert align_prefix_grad(name, grad, full) is grad


@given(mlp_grad_cases(), st.integers(1, 5))
def test_a_mismatch_on_the_other_axis_raises_shape_mismatch(case, extra):
    """Catches: silently truncating or padding the hidden axis, and an error that does not name
    the parameter and both shapes (house rule: bad input is named)."""
    name, full, _, dim = case
    wrong = list(full)
    wrong[1 - dim] += extra
    with pytest.raises(ShapeMismatch, match=re.escape(f"{name}: cannot align shape {wrong} to {list(full)}")):
        align_prefix_grad(name, torch.zeros(wrong), full)
    with pytest.raises(ShapeMismatch, match=re.escape(name)):
        align_prefix_grad(name, torch.zeros(*full, 1), full)


@st.composite
def sparse_cases(draw):
    name, full, _, dim = draw(mlp_grad_cases())
    chosen = draw(st.lists(st.integers(0, full[dim] - 1), unique=True, max_size=full[dim]))
    return name, full, dim, torch.tensor(chosen, dtype=torch.int64)


@given(sparse_cases(), st.data())
def test_sparse_grad_places_each_neuron_at_its_index_and_zeros_elsewhere(case, data):
    """Catches: rows/columns swapped for down_proj, indices taken relative to the local width,
    or leftovers outside the sent neurons."""
    name, full, dim, indices = case
    dense = data.draw(tensors(full))
    placed = align_sparse_grad(name, dense.index_select(dim, indices), indices, full)
    mask = torch.zeros(full[dim], dtype=torch.bool)
    mask[indices] = True
    shape = [1, 1]
    shape[dim] = full[dim]
    assert torch.equal(placed, torch.where(mask.view(shape), dense, torch.zeros(())))


@pytest.mark.parametrize("flaw", ["out_of_range", "negative", "duplicate", "float", "list", "2-d"])
@given(sparse_cases())
def test_bad_sparse_indices_raise_alignment_error_never_write(flaw, case):
    """Catches: index_copy_ crashing (or wrapping around) on bad peer input, and an error
    that does not say which parameter and what is wrong with its indices."""
    name, full, dim, indices = case
    size = full[dim]
    bad = {"out_of_range": torch.cat([indices, torch.tensor([size])]),
           "negative": torch.cat([indices, torch.tensor([-1])]),
           "duplicate": torch.cat([indices, indices[:1]]) if indices.numel() else torch.tensor([0, 0]),
           "float": indices.float(), "list": indices.tolist(), "2-d": indices.view(1, -1)}[flaw]
    values_shape = list(full)
    values_shape[dim] = len(bad) if isinstance(bad, list) else bad.numel()
    kind = "must be a 1-D int32/int64 tensor, got"
    says = {"out_of_range": f"is outside [0, {size - 1}]", "negative": f"is outside [0, {size - 1}]",
            "duplicate": "contain duplicates", "float": f"{kind} torch.float32 of shape [{indices.numel()}]",
            "list": f"{kind} list of shape []", "2-d": f"{kind} torch.int64 of shape [1, {indices.numel()}]"}[flaw]
    with pytest.raises(AlignmentError, match=re.escape(name) + ".*" + re.escape(says)):
        align_sparse_grad(name, torch.ones(values_shape), bad, full)


@given(sparse_cases(), st.integers(1, 3))
def test_sparse_values_that_do_not_fit_their_indices_raise_shape_mismatch(case, extra):
    """Catches: values of the wrong width broadcast or truncated into the target."""
    name, full, dim, indices = case
    values_shape = list(full)
    values_shape[dim] = indices.numel() + extra
    with pytest.raises(ShapeMismatch, match=re.escape(f"{name}: helper values of shape {values_shape}")):
        align_sparse_grad(name, torch.ones(values_shape), indices, full)


@pytest.mark.parametrize("flaw", ["zero", "negative", "no_ffn_axis"])
@given(mlp_grad_cases())
def test_an_invalid_target_shape_raises_shape_mismatch_naming_the_parameter(flaw, case):
    """Catches: a target without the FFN axis (a 1-D shape for down_proj's columns) indexed
    anyway, and errors that do not say which parameter asked."""
    name, full, _, dim = case
    if flaw == "no_ffn_axis" and dim == 0:
        return  # every non-empty shape has an axis 0
    target = {"zero": (0, full[1]), "negative": (full[0], -1), "no_ffn_axis": (full[0],)}[flaw]
    says = "has no axis 1" if flaw == "no_ffn_axis" else "is invalid: expected positive integers"
    with pytest.raises(ShapeMismatch, match=re.escape(f"{name}: target shape {list(target)}") + ".*" + says):
        align_sparse_grad(name, torch.ones(1, 1), torch.arange(1), target)
    if flaw != "no_ffn_axis":
        with pytest.raises(ShapeMismatch, match=re.escape(f"{name}: target shape {list(target)} {says}")):
            align_prefix_grad(name, torch.ones(full), target)


@pytest.mark.parametrize("name", [None, 3, b"mlp.gate_proj.weight", ("mlp", "gate_proj", "weight")])
def test_a_name_that_is_not_a_string_is_an_unsupported_parameter(name):
    """Catches: a non-string name crashing inside str methods instead of the typed error."""
    with pytest.raises(UnsupportedParameter, match=re.escape(repr(name))):
        prefix_dim(name)
