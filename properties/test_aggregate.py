"""Mean semantics and accounting of aggregation (sim/aggregate.py)."""
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.profiles import scaled
from properties.strategies import aggregation_cases, random_payload, random_sparse
from sim.aggregate import MeanSemantics, aggregate, homogeneous_update, receive
from sim.align import align_prefix_grad, prefix_dim
from sim.distro import ChunkGrid, decompress
from sim.model import full_shapes, is_mlp_sliced, local_shapes, mlp_layer
from sim.wire import encode_payload

SEMANTICS = list(MeanSemantics)
ROUND = 0   # the round aggregation_cases' payloads belong to


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@given(aggregation_cases())
def test_coeff_mean_heterogeneous_path_equals_the_fast_path_when_shapes_agree(case):
    """Catches: the heterogeneous path normalizing differently from batch_decompress
    (dividing by all peers, counting absent slots, a different decode)."""
    model, distro, payloads, receiver = case
    same = [random_payload(model, distro, receiver, peer=i, seed=i) for i in range(len(payloads))]
    result = aggregate(same, local_shapes(model, receiver), distro, MeanSemantics.COEFF_MEAN)
    fast = homogeneous_update(same)
    assert result.contributing_peers == len(same)
    for name, update in fast.items():
        assert torch.equal(result.updates[name], update), name


@pytest.mark.parametrize("semantics", SEMANTICS)
@scaled(0.5)
@given(aggregation_cases(min_peers=2), st.randoms(use_true_random=False))
def test_peer_order_does_not_change_the_result(semantics, case, rng):
    """Catches: order-dependent state (a running mean, a first-payload-wins shape)."""
    model, distro, payloads, receiver = case
    shuffled = payloads[:]
    rng.shuffle(shuffled)
    shapes = local_shapes(model, receiver)
    a, b = aggregate(payloads, shapes, distro, semantics), aggregate(shuffled, shapes, distro, semantics)
    assert a.contributing_peers == b.contributing_peers
    for name in shapes:
        close(a.updates[name], b.updates[name])


def decoded_in(payload, name, shape):
    """A payload's parameter decoded in its own shape, aligned to `shape`."""
    dense = decompress(payload.params[name])
    return dense if tuple(dense.shape) == tuple(shape) else align_prefix_grad(name, dense, shape)


def width_of(payload, name):
    return payload.params[name].grid.shape[prefix_dim(name)]


@scaled(0.5)
@given(aggregation_cases())
def test_region_mean_divides_each_element_by_the_contributors_covering_it(case):
    """Reference: neuron by neuron, the plain mean over the peers whose width reaches it.
    Catches: dividing the suffix by all peers, or the prefix by the tier-0 peers only."""
    model, distro, payloads, _ = case
    shapes = full_shapes(model)
    result = aggregate(payloads, shapes, distro, MeanSemantics.REGION_MEAN)
    for name, shape in shapes.items():
        if not is_mlp_sliced(name):
            close(result.updates[name], sum(decompress(p.params[name]) for p in payloads) / len(payloads))
            continue
        dim = prefix_dim(name)
        for j in range(shape[dim]):
            covering = [decoded_in(p, name, shape).select(dim, j) for p in payloads if width_of(p, name) > j]
            expected = torch.stack(covering).mean(0) if covering else torch.zeros(shape[1 - dim] if len(shape) == 2 else ())
            close(result.updates[name].select(dim, j), expected)


@scaled(0.5)
@given(aggregation_cases(min_peers=2))
def test_peer_mean_divides_the_tier0_only_suffix_by_all_contributors(case):
    """Psyche's heterogeneous normalization: where only tier-0 peers reach, the update is their
    sum over N, i.e. their mean diluted by N0/N (the reported `dilution`).
    Catches: a PEER_MEAN that silently became REGION_MEAN, or a dilution metric that lies."""
    model, distro, payloads, _ = case
    shapes = full_shapes(model)
    result = aggregate(payloads, shapes, distro, MeanSemantics.PEER_MEAN)
    n = len(payloads)
    for layer, factor in enumerate(result.dilution):
        assert factor == sum(p.tiers[layer] == 0 for p in payloads) / n
    for name, shape in shapes.items():
        if not is_mlp_sliced(name):
            continue
        dim, layer = prefix_dim(name), mlp_layer(name)
        narrow_reach = max((width_of(p, name) for p in payloads if p.tiers[layer] > 0), default=0)
        tier0 = [decoded_in(p, name, shape) for p in payloads if p.tiers[layer] == 0]
        suffix = result.updates[name].narrow(dim, narrow_reach, shape[dim] - narrow_reach)
        expected = sum(tier0) / n if tier0 else torch.zeros(shape)
        close(suffix, expected.narrow(dim, narrow_reach, shape[dim] - narrow_reach))
        if tier0 and suffix.numel():
            close(suffix * n / len(tier0), (sum(tier0) / len(tier0)).narrow(dim, narrow_reach, shape[dim] - narrow_reach))


@scaled(0.5)
@given(aggregation_cases())
def test_coeff_mean_makes_every_coefficient_the_mean_over_the_peers_that_sent_it(case):
    """Reference: a dict from (block, coefficient) to the values peers sent, in Python.
    Catches: dividing by all peers (PEER_MEAN's dilution), counting absent slots, misplaced blocks."""
    model, distro, payloads, receiver = case
    shapes = local_shapes(model, receiver)
    result = aggregate(payloads, shapes, distro, MeanSemantics.COEFF_MEAN)
    for name, shape in shapes.items():
        grid = ChunkGrid.of(shape, distro.compression_chunk)
        sent = {}
        for p in payloads:
            sparse = p.params[name]
            for block in torch.cartesian_prod(*[torch.arange(b) for b in sparse.grid.blocks]).reshape(-1, len(sparse.grid.blocks)).tolist():
                if any(b >= limit for b, limit in zip(block, grid.blocks)):
                    continue
                for index, value in zip(sparse.indices[tuple(block)].tolist(), sparse.values[tuple(block)].tolist()):
                    if index < grid.block_numel:
                        sent.setdefault((*block, index), []).append(value)
        expected = torch.zeros(*grid.blocks, grid.block_numel)
        for (*block, index), values in sent.items():
            expected[(*block, index)] = sum(values) / len(values)
        close(grid.encode(result.updates[name]), expected)


@pytest.mark.parametrize("semantics", SEMANTICS)
@scaled(0.5)
@given(aggregation_cases(), st.data())
def test_receivers_of_different_tiers_agree_on_every_element_they_share(semantics, case, data):
    """Replica consistency. Catches: a receiver's own tier leaking into the normalization
    (dividing by peers of its own width, aligning to the wrong prefix)."""
    model, distro, payloads, receiver = case
    other = data.draw(st.lists(st.integers(0, max(max(p.tiers) for p in payloads) if payloads else 0),
                               min_size=model.num_hidden_layers, max_size=model.num_hidden_layers).map(tuple))
    a = aggregate(payloads, local_shapes(model, receiver), distro, semantics)
    b = aggregate(payloads, local_shapes(model, other), distro, semantics)
    for name, update in a.updates.items():
        mine, theirs = update, b.updates[name]
        if mine.shape != theirs.shape:
            narrower = min(mine.shape, theirs.shape, key=lambda shape: shape.numel())
            mine, theirs = (align_prefix_grad(name, t, narrower) for t in (mine, theirs))
        close(mine, theirs)


@pytest.mark.parametrize("semantics", SEMANTICS)
@scaled(0.5)
@given(aggregation_cases())
def test_elements_outside_every_contributors_width_get_a_zero_update(semantics, case):
    """Catches: padding with garbage, or DCT blocks bleeding across the width boundary."""
    model, distro, payloads, _ = case
    shapes = full_shapes(model)
    result = aggregate(payloads, shapes, distro, semantics)
    for name, shape in shapes.items():
        if is_mlp_sliced(name) and payloads:
            dim, reach = prefix_dim(name), max(width_of(p, name) for p in payloads)
            assert torch.count_nonzero(result.updates[name].narrow(dim, reach, shape[dim] - reach)) == 0


FLAWS = ["flipped_byte", "truncated", "nan", "wrong_shape", "non_mlp_narrowed", "unknown_parameter", "bad_tier",
         "duplicate", "stale_round"]
EXPECTED_REASON = {"flipped_byte": {"bad_checksum", "bad_magic"}, "truncated": {"bad_checksum", "truncated"},
                   "nan": {"non_finite"}, "wrong_shape": {"bad_shape"}, "non_mlp_narrowed": {"bad_shape"},
                   "unknown_parameter": {"unknown_parameter"}, "bad_tier": {"bad_tier"}, "duplicate": {"duplicate"},
                   "stale_round": {"stale_round"}}


def malformed(flaw, model, distro, good, rng):
    """One bad payload of kind `flaw`, built from a good one."""
    payload = random_payload(model, distro, good.tiers, peer=99, seed=rng.randrange(2**20))
    name = rng.choice(sorted(payload.params))
    if flaw == "nan":
        payload.params[name].values.view(-1)[0] = float("nan")
    elif flaw == "wrong_shape" or flaw == "non_mlp_narrowed":
        candidates = sorted(n for n in payload.params if is_mlp_sliced(n) == (flaw == "wrong_shape"))
        name = rng.choice(candidates)
        sparse = payload.params[name]
        shape = list(sparse.grid.shape)
        shape[0] = shape[0] * 2
        payload.params[name] = random_sparse(tuple(shape), distro, torch.Generator().manual_seed(1))
    elif flaw == "unknown_parameter":
        payload.params["model.layers.0.mlp.gate_projection.weight"] = payload.params[name]
    elif flaw == "bad_tier":
        payload.tiers = (model.max_tier + 1,) * len(payload.tiers)
    elif flaw == "stale_round":  # another round's payload: well-formed, and not this round's
        payload.round = ROUND + 1
    data = bytearray(encode_payload(payload, distro.compression_chunk))
    if flaw == "flipped_byte":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif flaw == "truncated":
        data = data[:rng.randrange(len(data))]
    return bytes(data)


@pytest.mark.parametrize("flaw", FLAWS)
@scaled(0.2)
@given(aggregation_cases(), st.sampled_from(SEMANTICS), st.randoms(use_true_random=False))
def test_a_rejected_payload_changes_the_counts_and_nothing_else(flaw, case, semantics, rng):
    """contributing_peers counts only payloads that validated and aligned, a peer's second
    payload in a round is a duplicate. Catches: counting rejected payloads, a duplicate applied
    twice, a peer silently skipped, NaN reaching the aggregate, a malformed payload crashing
    the round or being silently dropped without a count."""
    model, distro, payloads, receiver = case
    if flaw == "nan" and distro.quantize_1bit:
        flaw = "flipped_byte"  # 1-bit values cannot carry NaN; the wire has nothing to validate there
    if flaw in ("non_mlp_narrowed", "duplicate") and not payloads:
        return
    raw = [encode_payload(p, distro.compression_chunk) for p in payloads]
    shapes = local_shapes(model, receiver)
    clean = receive(raw, model, distro, shapes, semantics, round_=ROUND)
    direct = aggregate(payloads, shapes, distro, semantics)  # receiving is decoding, then this
    assert all(torch.equal(clean.updates[name], direct.updates[name]) for name in shapes)
    if flaw == "duplicate":  # a copy arriving after the original (first come, first counted)
        original = rng.randrange(len(raw))
        bad, position = raw[original], rng.randrange(original + 1, len(raw) + 1)
    else:
        bad = malformed(flaw, model, distro, payloads[0] if payloads else random_payload(model, distro, receiver, 0, 0), rng)
        position = rng.randrange(len(raw) + 1)
    dirty = receive(raw[:position] + [bad] + raw[position:], model, distro, shapes, semantics, round_=ROUND)
    assert dirty.contributing_peers == clean.contributing_peers == len(payloads)
    assert sum(dirty.rejected.values()) == 1 and set(dirty.rejected) <= EXPECTED_REASON[flaw], dirty.rejected
    for name in shapes:
        assert torch.equal(dirty.updates[name], clean.updates[name])
        assert torch.isfinite(dirty.updates[name]).all()


def test_mismatched_chunk_grids_are_rejected_never_mixed(caplog):
    """I=192, chunk 64: tier 0 cuts rows in 64s, tier 1 (96 rows) in 48s. Under COEFF_MEAN
    the tier-1 payload cannot be placed and is rejected with chunk_grid_mismatch."""
    from sim.config import DistroConfig, load_config
    model = load_config("tiny").model.__class__(**{**load_config("tiny").model.__dict__, "intermediate_size": 192})
    distro = DistroConfig(compression_chunk=64, quantize_1bit=False)
    payloads = [random_payload(model, distro, (0, 0), 0, 1), random_payload(model, distro, (1, 1), 1, 2)]
    with caplog.at_level("INFO", logger="sim.aggregate"):
        result = aggregate(payloads, full_shapes(model), distro, MeanSemantics.COEFF_MEAN)
    assert result.contributing_peers == 1 and result.rejected == Counter(chunk_grid_mismatch=1)
    assert caplog.records[0].getMessage() == (
        "rejected payload from peer 1: chunk_grid_mismatch (model.layers.0.mlp.gate_proj.weight: sender blocks "
        "(48, 32) of [96, 32] do not line up with receiver blocks (64, 32) of [192, 32])")
    peer_mean = aggregate(payloads, full_shapes(model), distro, MeanSemantics.PEER_MEAN)
    assert peer_mean.contributing_peers == 2 and not peer_mean.rejected


def unalignable(model, distro, receiver, flaw, peer):
    """A payload that never crossed the wire and cannot align to the receiver: a non-FFN
    parameter of another shape, or a parameter missing."""
    payload = random_payload(model, distro, receiver, peer=peer, seed=peer)
    name = sorted(n for n in payload.params if not is_mlp_sliced(n))[0]
    if flaw == "non_ffn_axis_differs":
        shape = payload.params[name].grid.shape
        payload.params[name] = random_sparse((shape[0] * 2, *shape[1:]), distro, torch.Generator().manual_seed(peer))
    else:
        del payload.params[name]
    return payload


@pytest.mark.parametrize("flaw", ["non_ffn_axis_differs", "parameter_missing"])
@scaled(0.5)
@given(aggregation_cases(), st.sampled_from(SEMANTICS), st.integers(1, 3))
def test_payloads_that_cannot_align_are_rejected_as_bad_shape_and_change_nothing_else(flaw, case, semantics, bad):
    """aggregate() also takes payloads that never crossed the wire (a simulator's own, a test's).
    Each that cannot align is rejected as bad_shape and counted once; the rest aggregate as
    without them; with none left the update is zero in the receiver's shapes. Catches: an
    alignment error raised into the round, a rejected payload counted as contributing, counts
    that stop at 1, an all-rejected round returning no update."""
    model, distro, payloads, receiver = case
    shapes = local_shapes(model, receiver)
    unfit = [unalignable(model, distro, receiver, flaw, peer=100 + i) for i in range(bad)]
    clean = aggregate(payloads, shapes, distro, semantics)
    dirty = aggregate(unfit + payloads, shapes, distro, semantics)
    assert dirty.rejected == Counter(bad_shape=bad) and dirty.contributing_peers == clean.contributing_peers
    assert dirty.dilution == clean.dilution
    alone = aggregate(unfit, shapes, distro, semantics)
    assert alone.rejected == Counter(bad_shape=bad) and alone.contributing_peers == 0 and alone.dilution == ()
    for name, shape in shapes.items():
        assert torch.equal(dirty.updates[name], clean.updates[name])
        assert tuple(dirty.updates[name].shape) == tuple(shape)
        assert torch.equal(alone.updates[name], torch.zeros(shape))


@given(aggregation_cases(), st.sampled_from(SEMANTICS))
def test_dilution_is_each_layers_tier0_share_of_the_contributors(case, semantics):
    """Catches: a dilution metric computed under one semantics only, or over rejected payloads."""
    model, distro, payloads, receiver = case
    result = aggregate(payloads, local_shapes(model, receiver), distro, semantics)
    expected = tuple(sum(p.tiers[layer] == 0 for p in payloads) / len(payloads)
                     for layer in range(model.num_hidden_layers)) if payloads else ()
    assert result.dilution == expected


def test_a_payload_aggregate_cannot_place_is_logged_with_its_peer_and_error(caplog):
    """Catches: a bad_shape rejection logged without the sender or the error that caused it."""
    import logging

    from sim.config import load_config
    cfg = load_config("tiny")
    unfit = unalignable(cfg.model, cfg.distro, (0, 0), "non_ffn_axis_differs", peer=7)
    with caplog.at_level(logging.INFO, logger="sim.aggregate"):
        aggregate([unfit], local_shapes(cfg.model, 0), cfg.distro)
    [line] = [r.getMessage() for r in caplog.records if r.name == "sim.aggregate"]
    assert line.startswith("rejected payload from peer 7: bad_shape (UnsupportedParameter: parameter 'lm_head.weight'")


def test_every_rejection_is_logged_with_its_peer_reason_and_detail(caplog):
    """A rejected payload is never silently skipped: besides the count, one INFO line names
    the peer, the reason and what was wrong. Catches: a rejection counted but not logged,
    or logged without saying which peer or why."""
    import logging

    from sim.config import load_config
    cfg = load_config("tiny")
    shapes = local_shapes(cfg.model, 0)
    good = encode_payload(random_payload(cfg.model, cfg.distro, (0, 0), peer=3, seed=3), cfg.distro.compression_chunk)
    stale = random_payload(cfg.model, cfg.distro, (0, 0), peer=4, seed=4, round_=ROUND + 1)
    raw = [good, good, encode_payload(stale, cfg.distro.compression_chunk), good[:10]]
    with caplog.at_level(logging.INFO, logger="sim.aggregate"):
        result = receive(raw, cfg.model, cfg.distro, shapes, round_=ROUND)
    assert result.rejected == Counter(duplicate=1, stale_round=1, truncated=1) and result.contributing_peers == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "sim.aggregate"]
    assert lines == ["rejected payload from peer 3: duplicate (peer 3 already contributed to round 0)",
                     f"rejected payload from peer 4: stale_round (payload of round {ROUND + 1} arrived in round {ROUND})",
                     "rejected payload from peer ?: truncated (payload of 10 bytes is shorter than the 42-byte frame)"]
