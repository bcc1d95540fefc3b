"""A catalog of realistic mistakes, planted into the code under test only inside tests.

Each entry replaces one function (or table entry) with the buggy version a
well-meaning engineer might write, through pytest's monkeypatch, so nothing
outside a test can switch one on. `CATCHERS` names the properties that must
fail when it is planted: tests/test_planted_bugs.py checks that they do (and
how fast), and `MATSIM_PLANT=<name>` plants one for a whole pytest session
(root conftest.py), which is how the reproduce workflow is demonstrated.
"""
import dataclasses
import sys

import numpy as np
import torch

import sim.aggregate
import sim.align
import sim.checkpoint
import sim.distro
import sim.helper
import sim.model
import sim.schema
import sim.wire
from sim.config import ModelConfig


def _coefficient_means_over_every_payload(receiver, pairs):
    """Divides each coefficient's sum by the number of payloads, not by those that sent it."""
    updates = {}
    for group, indices, values in sim.aggregate._gathered_pairs(receiver, pairs):
        grid = group[0][0]
        mean = sim.distro.coefficient_sum(grid, indices, values) / len(pairs)
        updates.update(sim.aggregate._cut(group, grid.decode_blocks(mean)))
    return updates


def _coefficient_means_of_signs(receiver, pairs):
    """Takes each value's sign before the mean (harmless with 1-bit payloads, wrong without)."""
    signed = [dataclasses.replace(p, values=p.values.sign()) for p in pairs]
    return ORIGINAL["coefficient_means"](receiver, signed)


def _receive_counting_rejections(*args, **kwargs):
    result = ORIGINAL["receive_decoded"](*args, **kwargs)
    result.contributing_peers += sum(result.rejected.values())
    return result


def _receive_without_duplicate_check(decoded, receiver_shapes, distro, semantics=sim.aggregate.MeanSemantics.COEFF_MEAN,
                                     round_=None):
    """Forgets which peers already contributed: a duplicated payload counts (and weighs) twice."""
    from collections import Counter
    accepted, rejected = [], Counter()
    for result in decoded:
        if isinstance(result, sim.wire.Rejection):
            rejected[result.reason] += 1
        elif round_ is not None and result.round != round_:
            rejected["stale_round"] += 1
        else:
            accepted.append(result)
    return sim.aggregate.aggregate(accepted, receiver_shapes, distro, semantics, rejected)


def _aggregate_skipping_the_last(payloads, *args, **kwargs):
    """An off-by-one over the accepted payloads: the last peer is silently skipped."""
    return ORIGINAL["aggregate"](list(payloads)[:-1] if len(payloads) > 1 else payloads, *args, **kwargs)


def _prefix_dim_by_substring(name):
    """Matches module names anywhere in the path: `self_attn.down_proj_bias` counts as MLP."""
    for module, dim in sim.align.PREFIX_DIMS.items():
        if isinstance(name, str) and module in name:
            return dim
    raise sim.align.UnsupportedParameter(f"parameter {name!r} has no MatFormer prefix dimension")


def _align_padding_at_the_front(name, grad, target_shape):
    dim, target = sim.align.prefix_dim(name), tuple(target_shape)
    if grad.shape[dim] >= target[dim]:
        return ORIGINAL["align_prefix_grad"](name, grad, target_shape)
    padded = grad.new_zeros(target)
    padded.narrow(dim, target[dim] - grad.shape[dim], grad.shape[dim]).copy_(grad)
    return padded


def _select_by_masking(self, tensor, dim):
    """Masks the suffix instead of slicing it: the suffix is still read (0 * NaN is NaN)."""
    mask = torch.zeros(tensor.shape[dim], dtype=tensor.dtype, device=tensor.device)
    mask[:self.width] = 1
    shape = [1] * tensor.ndim
    shape[dim] = -1
    return tensor * mask.view(shape)


def _layout_ignoring_metadata(directory):
    """Reads a sliced checkpoint's stored width as the base width (tier 0): the next slice is a second one."""
    path, cfg, tier, tensors = ORIGINAL["checkpoint_layout"](directory)
    return path, ModelConfig(**{**cfg.__dict__, "intermediate_size": cfg.intermediate_size >> tier}), 0, tensors


def _schema_layout_keeping_the_tier(directory):
    """Hashes the stored (sliced) config instead of the base one: the tier leaks into the hash."""
    path, cfg, tier, tensors = ORIGINAL["checkpoint_layout"](directory)
    return path, ModelConfig(**{**cfg.__dict__, "intermediate_size": cfg.intermediate_size >> tier}), tier, tensors


def _expect_skipping_finiteness(ok, reason, detail):
    return ORIGINAL["expect"](ok or reason == "non_finite", reason, detail)


def _step_without_error_feedback(self, name, grad, lr, anchor=None):
    """Sends the top-k but never removes it from delta: the same update is sent again and again."""
    delta = self.delta.setdefault(name, torch.zeros_like(grad))
    delta.mul_(self.config.compression_decay).add_(grad, alpha=lr)
    sparse = sim.distro.compress(delta, self.config.compression_chunk, self.config.compression_topk)
    transmitted = sim.distro.decompress(sparse)
    return (sim.distro.quantize_1bit(sparse) if self.config.quantize_1bit else sparse), transmitted


def _suffix_order_over_the_whole_width(seed, layer, width, full):
    """Psyche's helper bug: indices drawn from [0, I), not from the suffix [width, I)."""
    keys = np.random.default_rng([seed, layer]).random(full)
    return torch.from_numpy(np.argsort(keys, kind="stable")[: full - width].astype(np.int64))


ORIGINAL = {
    "coefficient_means": sim.aggregate._coefficient_means,
    "receive_decoded": sim.aggregate.receive_decoded,
    "aggregate": sim.aggregate.aggregate,
    "align_prefix_grad": sim.align.align_prefix_grad,
    "checkpoint_layout": sim.checkpoint.checkpoint_layout,
    "expect": sim.wire._expect,
}

# name -> what goes wrong, and (object, attribute, replacement) patches; a dict
# object patches one key.
BUGS = {
    "coeff_mean_divides_by_all_peers": (
        "COEFF_MEAN divides a coefficient by every payload instead of the peers that sent it",
        [(sim.aggregate, "_coefficient_means", _coefficient_means_over_every_payload)]),
    "rejected_payloads_counted_as_contributing": (
        "contributing_peers counts payloads that were rejected",
        [(sim.aggregate, "receive_decoded", _receive_counting_rejections)]),
    "duplicate_payload_applied_twice": (
        "a peer's second payload in a round is aggregated again",
        [(sim.aggregate, "receive_decoded", _receive_without_duplicate_check)]),
    "peer_silently_skipped": (
        "the last accepted payload is dropped without a count",
        [(sim.aggregate, "aggregate", _aggregate_skipping_the_last)]),
    "down_proj_sliced_on_rows": (
        "down_proj's prefix taken on axis 0 (its rows) instead of its columns",
        [(sim.align.PREFIX_DIMS, "down_proj", 0)]),
    "substring_name_matching": (
        "parameter names matched by substring, so attention tensors look like MLP weights",
        [(module, "prefix_dim", _prefix_dim_by_substring) for module in (sim.align, sim.model, sim.aggregate)]),
    "gradient_padded_at_the_front": (
        "a narrow gradient zero-padded before the prefix instead of after it",
        [(sim.align, "align_prefix_grad", _align_padding_at_the_front),
         (sim.aggregate, "align_prefix_grad", _align_padding_at_the_front)]),
    "gradient_leaks_into_the_suffix": (
        "the MLP masks the suffix instead of slicing it",
        [(sim.model.MatFormerMLP, "_select", _select_by_masking)]),
    "double_slicing_not_detected": (
        "a sliced checkpoint's metadata ignored: it loads as a full model and is sliced again",
        [(sim.checkpoint, "checkpoint_layout", _layout_ignoring_metadata)]),
    "schema_hash_includes_the_tier": (
        "the schema hash is taken over the sliced config",
        [(sim.schema, "checkpoint_layout", _schema_layout_keeping_the_tier)]),
    "nan_payload_accepted": (
        "the wire's finiteness check is skipped",
        [(sim.wire, "_expect", _expect_skipping_finiteness)]),
    "sign_taken_before_the_mean": (
        "values reduced to signs before the coefficient mean",
        [(sim.aggregate, "_coefficient_means", _coefficient_means_of_signs)]),
    "error_feedback_dropped": (
        "DisTrO never subtracts what it transmitted from delta",
        [(sim.distro.DistroState, "step", _step_without_error_feedback)]),
    "helper_indices_from_the_whole_width": (
        "helper neurons drawn from [0, I), overlapping the peer's own prefix",
        [(sim.helper, "_suffix_order", _suffix_order_over_the_whole_width)]),
}

# name -> the properties ("module::test", or "module::test[arg=value]" for one case of a
# parametrized one) that must fail with it planted.
CATCHERS = {
    "coeff_mean_divides_by_all_peers": ["test_aggregate::test_coeff_mean_makes_every_coefficient_the_mean_over_the_peers_that_sent_it"],
    "rejected_payloads_counted_as_contributing": ["test_aggregate::test_a_rejected_payload_changes_the_counts_and_nothing_else[flaw=flipped_byte]"],
    "duplicate_payload_applied_twice": ["test_aggregate::test_a_rejected_payload_changes_the_counts_and_nothing_else[flaw=duplicate]"],
    "peer_silently_skipped": ["test_aggregate::test_a_rejected_payload_changes_the_counts_and_nothing_else[flaw=flipped_byte]"],
    "down_proj_sliced_on_rows": ["test_align::test_prefix_dim_is_rows_for_gate_up_and_columns_for_down_weight"],
    "substring_name_matching": ["test_align::test_every_non_mlp_name_is_rejected_even_at_equal_shape"],
    "gradient_padded_at_the_front": ["test_align::test_expanding_keeps_the_prefix_and_zero_fills_the_tail"],
    "gradient_leaks_into_the_suffix": ["test_zero_tail::test_tier_grads_are_zero_outside_the_prefix_and_equal_an_independent_tier_model"],
    "double_slicing_not_detected": ["test_checkpoint::test_universal_on_a_sliced_checkpoint_raises_double_slicing"],
    "schema_hash_includes_the_tier": ["test_checkpoint::test_schema_hash_is_the_same_for_every_tier_export_and_load_strategy"],
    "nan_payload_accepted": ["test_wire::test_a_non_finite_value_is_rejected_as_non_finite"],
    "sign_taken_before_the_mean": ["test_aggregate::test_coeff_mean_makes_every_coefficient_the_mean_over_the_peers_that_sent_it"],
    "error_feedback_dropped": ["test_distro::test_error_feedback_conserves_the_delta"],
    "helper_indices_from_the_whole_width": ["test_helper::test_helper_indices_are_sorted_unique_and_inside_the_full_width_suffix"],
}


def plant(monkeypatch, name: str) -> None:
    """Switch bug `name` on for the rest of the monkeypatch's scope. A replaced function is
    also replaced in the property modules that imported it by name, so properties that
    call it directly see the bug too."""
    if name not in BUGS:
        raise KeyError(f"planted bug {name!r} is unknown: the catalog has {', '.join(sorted(BUGS))}")
    for target, attribute, replacement in BUGS[name][1]:
        if isinstance(target, dict):
            monkeypatch.setitem(target, attribute, replacement)
            continue
        original = getattr(target, attribute)
        monkeypatch.setattr(target, attribute, replacement)
        for module in [m for n, m in sys.modules.items() if n.startswith("properties.")]:
            if getattr(module, attribute, None) is original:
                monkeypatch.setattr(module, attribute, replacement)
