"""A catalog of realistic mistakes, planted into the code under test only inside tests.

Each entry replaces one function (or table entry) with the buggy version a
well-meaning engineer might write, through pytest's monkeypatch, so nothing
outside a test can switch one on. `CATCHERS` names the properties that must
fail when it is planted: tests/test_planted_bugs.py checks that they do (and
how fast), and `MATSIM_PLANT=<name>` plants one for a whole pytest session
(root conftest.py), which is how the reproduce workflow is demonstrated.
"""
import dataclasses
import functools
import importlib
import re
import sys

import numpy as np
import torch

import sim.aggregate
import sim.align
import sim.assignment
import sim.checkpoint
import sim.config
import sim.data
import sim.distro
import sim.engine
import sim.faults
import sim.helper
import sim.model
import sim.peer
import sim.run
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


def _step_without_error_feedback(states, name, grads, lr, anchor=None):
    """Sends the top-k but never removes it from delta: the same update is sent again and again."""
    sent, transmitted = ORIGINAL["step_stacked"](states, name, grads, lr, anchor)
    for state, now in zip(states, transmitted.unbind(0)):
        state.delta[name] += now   # put back what was sent
    return sent, transmitted


def _suffix_order_over_the_whole_width(seed, layer, width, full):
    """Psyche's helper bug: indices drawn from [0, I), not from the suffix [width, I)."""
    keys = np.random.default_rng([seed, layer]).random(full)
    return torch.from_numpy(np.argsort(keys, kind="stable")[: full - width].astype(np.int64))


# --- integration bugs: each wrong end to end, in code the unit properties never call --------

def _is_narrow(payload) -> bool:
    return max(payload.tiers) > 0


def _skewed(payload, factor, names=None):
    """`payload` with its values (all, or those of `names`) multiplied by `factor`."""
    params = {n: sim.distro.Sparse(s.grid, s.indices, s.values * factor) if names is None or n in names else s
              for n, s in payload.params.items()}
    return sim.wire.Payload(payload.peer, payload.round, payload.tiers, params, payload.quantized,
                            payload.helper_neurons, payload.helper_params)


def _aggregate_zeroing_narrow_payloads(payloads, *args, **kwargs):
    """Receivers zero every tier > 0 payload (a wrongly scoped mask) and still count it."""
    return ORIGINAL["aggregate"]([_skewed(p, 0.0) if _is_narrow(p) else p for p in payloads], *args, **kwargs)


def _aligned_blocks_dropping_narrow(name, sent, positions, grid):
    """COEFF_MEAN: a narrow sender's MLP blocks are skipped instead of aligned."""
    if sent == grid:
        return positions
    shape = list(positions.shape)
    shape[sim.align.prefix_dim(name)] = grid.blocks[sim.align.prefix_dim(name)]
    return positions.new_full(shape, -1)


def _dense_sum_dropping_narrow(name, payloads, shape):
    """PEER_MEAN / REGION_MEAN: a narrow sender's MLP tensors are skipped instead of aligned."""
    same = [p for p in payloads if p.params[name].grid.shape == tuple(shape)]
    if not same:
        return torch.zeros(shape, dtype=payloads[0].params[name].values.dtype), torch.zeros(shape)
    return ORIGINAL["dense_sum"](name, same, shape)


def _coefficient_means_with_the_suffix_over_all(receiver, pairs):
    """COEFF_MEAN's suffix divided by every payload: a coefficient only wide peers send is
    diluted by the narrow ones, as if they had sent zeros."""
    updates = ORIGINAL["coefficient_means"](receiver, pairs)
    for name, update in updates.items():
        if sim.model.is_mlp_sliced(name):
            shape = update.shape
            covered = sum(sim.aggregate._coverage(name, dict((n, g.shape) for n, g, _ in p.signature)[name], shape)
                          for p in pairs)
            updates[name] = update * covered / len(pairs)
    return updates


def _step_resetting_error_feedback(states, name, grads, lr, anchor=None):
    """The residual is thrown away every step: what top-k left behind is never sent."""
    for state in states:
        state.delta.pop(name, None)
    return ORIGINAL["step_stacked"](states, name, grads, lr, anchor)


def _align_into_the_last_neurons(name, grad, target_shape):
    """A narrow gradient placed at the end of the FFN axis: its neurons land on the suffix."""
    dim, target = sim.align.prefix_dim(name), tuple(target_shape)
    if grad.shape[dim] >= target[dim]:
        return ORIGINAL["align_prefix_grad"](name, grad, target_shape)
    placed = grad.new_zeros(target)
    placed.narrow(dim, target[dim] - grad.shape[dim], grad.shape[dim]).copy_(grad)
    return placed


def _aligned_blocks_into_the_last(name, sent, positions, grid):
    """COEFF_MEAN: a narrow sender's blocks placed last along the FFN axis."""
    if sent == grid:
        return positions
    dim = sim.align.prefix_dim(name)
    pad = list(positions.shape)
    pad[dim] = grid.blocks[dim] - sent.blocks[dim]
    if pad[dim] < 0:
        return ORIGINAL["aligned_blocks"](name, sent, positions, grid)
    return torch.cat([positions.new_full(pad, -1), positions], dim=dim)


def _compress_keeping_the_smallest(x, chunk, topk, lead=0, zero_blocks="absent"):
    """top-k with largest=False: the k smallest coefficients of every block go out."""
    grid = sim.distro.ChunkGrid.of(x.shape[lead:], chunk)
    coeffs = grid.encode(x)
    indices = coeffs.abs().topk(min(topk, grid.block_numel), dim=-1, largest=False).indices
    values = coeffs.gather(-1, indices)
    return sim.distro.Sparse(grid, torch.where(values == 0, grid.block_numel, indices), values)


def _payload_flipped_for_narrow_peers(*args, **kwargs):
    """A narrow peer's payload goes out with its signs flipped (a sign convention lost on the narrow path)."""
    payload = ORIGINAL["make_payload"](*args, **kwargs)
    return _skewed(payload, -1.0) if _is_narrow(payload) else payload


def _apply_skipping_the_final_norm(params, updates, *args, **kwargs):
    """One parameter (the final norm) never updated by receivers: left out of the apply."""
    replicas = [params] if isinstance(params, dict) else list(params)
    kept = [{n: p for n, p in replica.items() if n != "model.norm.weight"} for replica in replicas]
    return ORIGINAL["apply_update"](kept, updates, *args, **kwargs)


def _receive_accepting_stale_rounds(decoded, receiver_shapes, distro, semantics=sim.aggregate.MeanSemantics.COEFF_MEAN,
                                    round_=None):
    """The round check is skipped: a late payload is aggregated in the next round."""
    return ORIGINAL["receive_decoded"](decoded, receiver_shapes, distro, semantics, None)


def _align_sparse_at_the_prefix(name, values, indices, target_shape):
    """A helper slab placed at its local positions 0..h-1 instead of at its neurons."""
    return ORIGINAL["align_sparse_grad"](name, values, torch.arange(indices.numel(), dtype=torch.int64), target_shape)


def _apply_decaying_twice(replicas, updates, lr, rule, weight_decay):
    """Decoupled weight decay applied once by the optimizer and once more by the apply."""
    if weight_decay:
        with torch.no_grad():
            for replica in replicas:
                for param in replica.values():
                    param.mul_(1 - lr * weight_decay)
    return ORIGINAL["apply_elementwise"](replicas, updates, lr, rule, weight_decay)


def _every_trainer_dealt_the_first_batch(trainers, total, data_index, seed):
    """Every trainer is dealt the first trainer's sequences (the split forgets to advance)."""
    assigned = ORIGINAL["assign"](trainers, total, data_index, seed)
    first = next(iter(assigned.values()), range(0))
    return {trainer: range(first.start, first.start + len(span)) for trainer, span in assigned.items()}


def _rejoin_keeping_the_stale_replica(self, peer_id, via="current", tier=None):
    """A churned peer comes back with the replica it left with, not the current weights."""
    stale = self.peers[peer_id].model
    ORIGINAL["rejoin"](self, peer_id, via, tier)
    if stale is not None and self.shared is None:
        self.peers[peer_id].model = stale.set_tiers(self.peers[peer_id].tiers)


# --- what a round's record reports (the convergence criteria read it) -----------------

def _one_bit_zeros_stay_zero(sparse, zero_blocks="absent"):
    """Psyche's 1-bit mode modelled with sign(): a sent zero goes out as 0, not as +1."""
    return sim.distro.Sparse(sparse.grid, sparse.indices, sparse.values.sign())


def _clip_ignored(grads, max_norm):
    """clip_grad_norm read from the config and never applied."""
    return grads


def _batch_ramp_ignored(self, step):
    """Every round trains global_batch_size_start: the batch schedule is read but never ramps."""
    return step * self.global_batch_size, self.global_batch_size


def _cold_start_ignored(self, step):
    """The cold-start warmup factor left out of the round's rate."""
    return self.lr_schedule.lr(step)


def _lr_a_round_ahead(self, step):
    """The schedule is read at the next round (a 1-based step fed a 0-based round)."""
    return ORIGINAL["lr"](self, step + 1)


def _eval_on_a_training_shard(self):
    """The held-out loss is taken on peer 0's round-0 training shard."""
    held_out = self.held_out
    self.held_out = sim.data.sequences(self.source, self.seed, range(held_out.shape[0]), held_out.shape[1]
                                       ).to(held_out.device)
    try:
        return ORIGINAL["eval_loss"](self)
    finally:
        self.held_out = held_out


def _held_out_pieces_weighed_equally(self):
    """The held-out loss averages its micro-batches' means with equal weights: with unequal
    pieces (16 sequences in pieces of 3: five of 3, then 1) the last sequence weighs 3 times."""
    model = self._full_replica()
    tiers = model.layer_tiers
    model.set_tiers(model.stored_tiers)
    with torch.no_grad():
        pieces = sim.peer.micro_batches(self.held_out, self.config.micro_batch_size)
        loss = sum(model(piece[:, :-1], piece[:, 1:])[1] for piece in pieces) / len(pieces)
    model.set_tiers(tiers)
    return loss.item()


def _record_averaging_the_loss_over_counted_peers(self, round_, sent, rejected, contributing, *args, **kwargs):
    """The round's training loss divides the present peers' sum by the payloads that counted."""
    record = ORIGINAL["record"](self, round_, sent, rejected, contributing, *args, **kwargs)
    record["loss"] = sum(s.loss for s in sent) / max(contributing[0], 1)
    return record


def _step_stacked_twice(states, name, grads, lr, anchor=None):
    """A peer's DisTrO state advanced twice in one round (a retry that forgot the first)."""
    ORIGINAL["step_stacked"](states, name, grads, lr, anchor)
    return ORIGINAL["step_stacked"](states, name, grads, lr, anchor)


# --- the exact reference's newer dimensions: each only a mode it draws meets -------------

def _step_ignoring_the_helper_anchor(states, name, grads, lr, anchor=None):
    """A helper slab's residual is never restarted when the helper neurons rotate: last
    epoch's residual, for other neurons, goes out as this epoch's (lossless mode has none)."""
    return ORIGINAL["step_stacked"](states, name, grads, lr, None)


def _apply_with_moments_per_shape(params, updates, lr, rule=sim.aggregate.ApplyRule.SIGN, weight_decay=0.0,
                                  adam_state=None, *args, **kwargs):
    """AdamW's moments kept per receiver shape: a replica that joins from a sliced checkpoint
    starts from fresh moments, and drifts from the others."""
    replicas = [params] if isinstance(params, dict) else list(params)
    if rule is not sim.aggregate.ApplyRule.ADAMW:
        return ORIGINAL["apply_update"](params, updates, lr, rule, weight_decay, adam_state, *args, **kwargs)
    shapes: dict[tuple, list] = {}
    for replica in replicas:
        shapes.setdefault(tuple((n, tuple(p.shape)) for n, p in replica.items()), []).append(replica)
    for key, same in shapes.items():
        own = {n: sim.align.align_prefix_grad(n, updates[n], shape) if tuple(updates[n].shape) != shape else updates[n]
               for n, shape in key}
        ORIGINAL["apply_update"](same, own, lr, rule, weight_decay, adam_state.setdefault(("shape", key), {}),
                                 *args, **kwargs)


def _chunk_size_capped_at_16(n, chunk):
    """DCT blocks sized for the default chunk, whatever the config says (16 hard-coded)."""
    return max(d for d in range(1, min(n, 16) + 1) if n % d == 0)


def _serial_round_as_one_group(network, peers, round_, batching):
    """Batching off puts the round's peers of one batch size in one serial group (shape
    forgotten), compressed at the first one's shape."""
    if batching != "off":
        return ORIGINAL["groups"](network, peers, round_, batching)
    by_size: dict[int, list] = {}
    for peer in peers:
        by_size.setdefault(len(network.assignment(round_)[peer.id]), []).append(peer)
    return [(members, False) for members in by_size.values()]


_LAST_AGGREGATE: dict = {}


def _aggregate_repeating_the_last_when_empty(payloads, receiver_shapes, *args, **kwargs):
    """A round with no accepted payload applies the last round's aggregate again (a cached
    update that nothing clears)."""
    key = tuple((n, tuple(shape)) for n, shape in receiver_shapes.items())
    result = ORIGINAL["aggregate"](payloads, receiver_shapes, *args, **kwargs)
    if result.contributing_peers == 0 and key in _LAST_AGGREGATE:
        result.updates = dict(_LAST_AGGREGATE[key])
    elif result.contributing_peers:
        _LAST_AGGREGATE[key] = result.updates
    return result


def _first_fault_only(self, round_):
    """A peer's faults of one round: only the first acts (a late corrupted payload arrives on time)."""
    return {peer: faults[:1] for peer, faults in ORIGINAL["on_payloads"](self, round_).items()}


def _encode_float32_as_float16(payload, chunk):
    """Unquantized float32 values rounded through float16 on their way to the wire."""
    def rounded(sparses):
        return {n: sim.distro.Sparse(s.grid, s.indices, s.values.half().to(s.values.dtype)
                                     if s.values.dtype == torch.float32 else s.values) for n, s in sparses.items()}
    if not payload.quantized:
        payload = sim.wire.Payload(payload.peer, payload.round, payload.tiers, rounded(payload.params),
                                   payload.quantized, payload.helper_neurons, rounded(payload.helper_params))
    return ORIGINAL["encode_payload"](payload, chunk)


# --- batched gradients (sim/engine.py): bugs that live in the batched path alone -------

def _batched_on_anothers_batch(model, replicas, tokens, micro_batch_size=None):
    """The group's batches stacked in another order than its weights: each peer trains on
    another peer's batch and sends the result as its own."""
    return ORIGINAL["batched_gradients"](model, replicas, tokens.flip(0), micro_batch_size)


def _batched_averaged_over_the_group(model, replicas, tokens, micro_batch_size=None):
    """The vmapped loss averaged over the group as well as the batch: every batched gradient
    divided by the group's size."""
    grads, losses = ORIGINAL["batched_gradients"](model, replicas, tokens, micro_batch_size)
    return {name: g / tokens.shape[0] for name, g in grads.items()}, losses


ORIGINAL = {
    "coefficient_means": sim.aggregate._coefficient_means,
    "receive_decoded": sim.aggregate.receive_decoded,
    "aggregate": sim.aggregate.aggregate,
    "align_prefix_grad": sim.align.align_prefix_grad,
    "checkpoint_layout": sim.checkpoint.checkpoint_layout,
    "expect": sim.wire._expect,
    "dense_sum": sim.aggregate._dense_sum,
    "step_stacked": sim.distro.step_stacked,
    "aligned_blocks": sim.aggregate._aligned_blocks,
    "make_payload": sim.peer.make_payload,
    "apply_update": sim.aggregate.apply_update,
    "align_sparse_grad": sim.aggregate.align_sparse_grad,
    "apply_elementwise": sim.aggregate._apply_elementwise,
    "assign": sim.assignment.assign,
    "lr": sim.config.CosineSchedule.lr,
    "eval_loss": sim.run.Network.eval_loss,
    "record": sim.run.Network.record,
    "rejoin": sim.run.Network.rejoin,
    "batched_gradients": sim.engine.batched_gradients,
    "groups": sim.engine.groups,
    "on_payloads": sim.faults.FaultPlan.on_payloads,
    "encode_payload": sim.wire.encode_payload,
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
        [(sim.distro, "step_stacked", _step_without_error_feedback)]),
    "helper_indices_from_the_whole_width": (
        "helper neurons drawn from [0, I), overlapping the peer's own prefix",
        [(sim.helper, "_suffix_order", _suffix_order_over_the_whole_width)]),
    # The integration catalog (INTEGRATION below): wrong end to end, checked by whole runs.
    "narrow_payloads_zeroed_but_counted": (
        "receivers zero every tier>0 payload but still count it as contributing",
        [(sim.aggregate, "aggregate", _aggregate_zeroing_narrow_payloads)]),
    "narrow_mlp_contributions_dropped": (
        "receivers drop tier>0 MLP contributions instead of aligning them",
        [(sim.aggregate, "_aligned_blocks", _aligned_blocks_dropping_narrow),
         (sim.aggregate, "_dense_sum", _dense_sum_dropping_narrow)]),
    "suffix_divided_by_all_peers": (
        "COEFF_MEAN divides the suffix by all peers, not by the peers that sent it",
        [(sim.aggregate, "_coefficient_means", _coefficient_means_with_the_suffix_over_all)]),
    "error_feedback_reset_every_step": (
        "DisTrO's residual is reset to zero every step",
        [(sim.distro, "step_stacked", _step_resetting_error_feedback)]),
    "narrow_gradients_aligned_into_the_last_neurons": (
        "the receiver aligns a tier-1 gradient into the last neurons of the FFN axis",
        [(sim.aggregate, "_aligned_blocks", _aligned_blocks_into_the_last),
         (sim.aggregate, "align_prefix_grad", _align_into_the_last_neurons)]),
    "topk_keeps_the_smallest": (
        "top-k keeps the smallest coefficients of every block",
        [(sim.distro, "compress", _compress_keeping_the_smallest)]),
    "sign_flipped_for_narrow_peers": (
        "a narrow peer's payload goes out sign-flipped",
        [(sim.peer, "make_payload", _payload_flipped_for_narrow_peers)]),
    "one_parameter_never_updated": (
        "receivers never apply the update of one parameter (the final norm)",
        [(sim.aggregate, "apply_update", _apply_skipping_the_final_norm)]),
    "late_payload_accepted_next_round": (
        "the round check is skipped: a late payload counts in the next round",
        [(sim.aggregate, "receive_decoded", _receive_accepting_stale_rounds)]),
    "helper_slab_placed_at_the_prefix": (
        "a helper slab is placed at rows 0..h-1 instead of at its neurons",
        [(sim.aggregate, "align_sparse_grad", _align_sparse_at_the_prefix)]),
    "one_bit_zeros_sent_as_zero": (
        "Psyche's 1-bit mode sends an all-zero block's top-k as 0 instead of +1 (sign bit of +0.0)",
        [(sim.distro, "quantize_1bit", _one_bit_zeros_stay_zero)]),
    "clip_grad_norm_ignored": (
        "Distro's clip_grad_norm is read and never applied",
        [(sim.peer, "clip_stacked", _clip_ignored)]),
    "batch_ramp_ignored": (
        "the global batch stays at global_batch_size_start: Psyche's ramp is never applied",
        [(sim.config.RunConfig, "data_schedule", _batch_ramp_ignored)]),
    "cold_start_warmup_ignored": (
        "the first epoch's cold-start warmup factor is left out of the rate",
        [(sim.config.RunConfig, "lr", _cold_start_ignored)]),
    "weight_decay_applied_twice": (
        "decoupled weight decay applied twice per round",
        [(sim.aggregate, "_apply_elementwise", _apply_decaying_twice)]),
    "every_peer_trains_on_one_shard": (
        "every trainer is dealt the first trainer's sequences",
        [(sim.assignment, "assign", _every_trainer_dealt_the_first_batch)]),
    "rejoined_peer_keeps_its_stale_replica": (
        "a churned peer rejoins with the replica it left with",
        [(sim.run.Network, "rejoin", _rejoin_keeping_the_stale_replica)]),
    # What a round's record reports (METRICS below).
    "lr_schedule_a_round_ahead": (
        "the learning-rate schedule is read one round ahead",
        [(sim.config.CosineSchedule, "lr", _lr_a_round_ahead)]),
    "eval_on_a_training_shard": (
        "the held-out loss is measured on a training shard",
        [(sim.run.Network, "eval_loss", _eval_on_a_training_shard)]),
    "mean_loss_over_counted_peers": (
        "the round's training loss divides by the payloads that counted, not the peers that trained",
        [(sim.run.Network, "record", _record_averaging_the_loss_over_counted_peers)]),
    # In no group of runs below: a default run evaluates in one piece, so it never meets this.
    "held_out_pieces_weighed_equally": (
        "the held-out loss averages its micro-batches with equal weights, whatever their sizes",
        [(sim.run.Network, "eval_loss", _held_out_pieces_weighed_equally)]),
    # The exact reference's newer dimensions (REFERENCE_MODES below).
    "helper_residual_kept_across_rotations": (
        "a helper slab's residual is not restarted when its neurons rotate",
        [(sim.distro, "step_stacked", _step_ignoring_the_helper_anchor)]),
    "adamw_moments_per_receiver_shape": (
        "AdamW's moments kept per receiver shape: a sliced-checkpoint joiner starts from fresh moments",
        [(sim.aggregate, "apply_update", _apply_with_moments_per_shape)]),
    "dct_blocks_capped_at_16": (
        "DCT blocks sized for the default chunk 16 whatever compression_chunk says",
        [(sim.distro, "chunk_size", _chunk_size_capped_at_16)]),
    "serial_round_compressed_as_one_group": (
        "batching off trains the round's peers as one serial group, compressed at one peer's shape",
        [(sim.engine, "groups", _serial_round_as_one_group)]),
    "empty_round_repeats_the_last_aggregate": (
        "a round with no accepted payload applies the last round's aggregate again",
        [(sim.aggregate, "aggregate", _aggregate_repeating_the_last_when_empty)]),
    "only_the_first_fault_of_a_peer_acts": (
        "of a peer's two faults in a round only the first acts",
        [(sim.faults.FaultPlan, "on_payloads", _first_fault_only)]),
    "float32_values_sent_as_float16": (
        "unquantized float32 payload values rounded through float16 on the wire",
        [(sim.wire, "encode_payload", _encode_float32_as_float16)]),
    "distro_state_advanced_twice": (
        "a peer's DisTrO state stepped twice in one round",
        [(sim.distro, "step_stacked", _step_stacked_twice)]),
    "batched_peer_trains_on_anothers_batch": (
        "batched peers' batches stacked in another order than their weights",
        [(sim.engine, "batched_gradients", _batched_on_anothers_batch)]),
    "batched_gradient_averaged_over_the_group": (
        "a batched gradient divided by the size of its group",
        [(sim.engine, "batched_gradients", _batched_averaged_over_the_group)]),
}

# Bugs that only whole runs show: the convergence criteria's detection power is measured on
# these (scripts/power.py), and each is caught by a reference property in CI.
INTEGRATION = ("narrow_payloads_zeroed_but_counted", "narrow_mlp_contributions_dropped", "suffix_divided_by_all_peers",
               "error_feedback_reset_every_step", "narrow_gradients_aligned_into_the_last_neurons",
               "topk_keeps_the_smallest", "sign_flipped_for_narrow_peers", "one_parameter_never_updated",
               "late_payload_accepted_next_round", "helper_slab_placed_at_the_prefix", "weight_decay_applied_twice",
               "every_peer_trains_on_one_shard", "rejoined_peer_keeps_its_stale_replica", "distro_state_advanced_twice")

# Bugs in what a round's record reports: the lr, the losses the criteria read.
METRICS = ("lr_schedule_a_round_ahead", "eval_on_a_training_shard", "mean_loss_over_counted_peers")

# Bugs in following Psyche's config surface and modes (its optimizer's clipping, batch ramp,
# cold start, 1-bit zeros).
PSYCHE = ("clip_grad_norm_ignored", "batch_ramp_ignored", "cold_start_warmup_ignored", "one_bit_zeros_sent_as_zero")

# Bugs that only a mode the exact reference's strategy newly draws meets (issue 27): compressed
# helpers, AdamW joins through sliced checkpoints, chunk 8 and tier 3, batching off, rounds where
# no payload counts, two faults on one peer, float32.
REFERENCE_MODES = ("helper_residual_kept_across_rotations", "adamw_moments_per_receiver_shape",
                   "dct_blocks_capped_at_16", "serial_round_compressed_as_one_group",
                   "empty_round_repeats_the_last_aggregate", "only_the_first_fault_of_a_peer_acts",
                   "float32_values_sent_as_float16")

# Bugs that live in the batched gradients alone (sim/engine.py): by design, a run with
# batching off never meets them.
BATCHED = ("batched_peer_trains_on_anothers_batch", "batched_gradient_averaged_over_the_group")

# Bugs that change what a run computes or records; each must change a default (auto-batched)
# run and a batching-off run alike, or the batched one alone for BATCHED (tests/test_bug_paths.py).
RUN_BUGS = INTEGRATION + METRICS + PSYCHE + BATCHED

LOSSLESS_REFERENCE = "test_reference::test_every_round_of_a_lossless_run_equals_the_exact_reference"
COMPRESSED_REFERENCE = "test_reference::test_every_compressed_round_equals_an_independent_demo_step"
BATCHED_EQUALS_SERIAL = "test_engine::test_batched_peers_compute_the_gradients_and_send_the_payloads_each_would_alone"

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
    **{bug: [LOSSLESS_REFERENCE] for bug in INTEGRATION + METRICS},
    # A late payload needs a drawn "late" fault to show in a whole run (not every ci run draws
    # one); the receive property offers a stale frame in every example.
    "late_payload_accepted_next_round": [
        "test_aggregate::test_a_rejected_payload_changes_the_counts_and_nothing_else[flaw=stale_round]"],
    "error_feedback_reset_every_step": [COMPRESSED_REFERENCE],
    "topk_keeps_the_smallest": [COMPRESSED_REFERENCE],
    "distro_state_advanced_twice": [COMPRESSED_REFERENCE],
    **{bug: [LOSSLESS_REFERENCE] for bug in PSYCHE},
    "one_bit_zeros_sent_as_zero": [
        "test_distro::test_sent_zero_blocks_go_out_at_their_lowest_indices_and_as_plus_one_under_one_bit"],
    **{bug: [BATCHED_EQUALS_SERIAL] for bug in BATCHED},
    "helper_residual_kept_across_rotations": [COMPRESSED_REFERENCE],
    "adamw_moments_per_receiver_shape": [LOSSLESS_REFERENCE],
    "dct_blocks_capped_at_16": [COMPRESSED_REFERENCE],
    "serial_round_compressed_as_one_group": [LOSSLESS_REFERENCE],
    "empty_round_repeats_the_last_aggregate": [LOSSLESS_REFERENCE],
    "only_the_first_fault_of_a_peer_acts": [LOSSLESS_REFERENCE],
    "float32_values_sent_as_float16": [LOSSLESS_REFERENCE],
    # The exact reference draws micro-batches of 3 too, but its float32 tolerance passes this
    # bias on random weights (per-sequence losses near log V): it finds it ~5 runs in 6.
    "held_out_pieces_weighed_equally": [
        "test_micro_batches::test_the_held_out_loss_is_the_mean_over_all_its_tokens_whatever_the_micro_batch_size"],
}


def plant(monkeypatch, name: str) -> None:
    """Switch bug `name` on for the rest of the monkeypatch's scope. A replaced function is
    replaced wherever a module holds it: in its own module and in every loaded module that
    imported it by name (`references`), so every caller meets the bug, whatever the path."""
    if name not in BUGS:
        raise KeyError(f"planted bug {name!r} is unknown: the catalog has {', '.join(sorted(BUGS))}")
    # COEFF_MEAN's alignment is cached per sender shape: a bug planted there needs empty caches,
    # and the real ones (restored afterwards) must never hold what a bug worked out.
    for module, cached in ((sim.aggregate, "_sender_map"), (sim.aggregate, "_block_map"), (sim.distro, "_grid")):
        monkeypatch.setattr(module, cached, functools.lru_cache(maxsize=256)(getattr(module, cached).__wrapped__))
    _LAST_AGGREGATE.clear()
    for target, attribute, replacement in BUGS[name][1]:
        if isinstance(target, dict):
            monkeypatch.setitem(target, attribute, replacement)
            continue
        original = getattr(target, attribute)
        monkeypatch.setattr(target, attribute, replacement)
        for module, alias in references(original):
            monkeypatch.setattr(module, alias, replacement)


def references(function) -> list[tuple[object, str]]:
    """(module, name) of every loaded module's global bound to `function`, this catalog's
    own table of originals aside: where a by-name import keeps the original alive."""
    found = []
    for module in list(sys.modules.values()):
        if module is None or module is sys.modules[__name__]:
            continue
        for alias, value in list(getattr(module, "__dict__", {}).items()):
            if value is function:
                found.append((module, alias))
    return found


def property_function(ref: str):
    """The Hypothesis test a catcher names, and the arguments of its parametrized case."""
    module, name, case = re.fullmatch(r"(\w+)::(\w+)(?:\[(\w+=\w+)\])?", ref).groups()
    test = getattr(importlib.import_module(f"properties.{module}"), name)
    return test, dict([case.split("=")]) if case else {}
