"""Helper mode (sim/helper.py): which suffix neurons a narrow peer trains, the
gradients it sends for them, and how receivers merge them."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.profiles import scaled
from properties.strategies import SEEDS, helper_cases, layer_tier_maps, model_configs, widths_and_tiers
from sim.aggregate import MeanSemantics, aggregate
from sim.align import align_prefix_grad, prefix_dim
from sim.distro import decompress
from sim.helper import _suffix_order, helper_count, helper_indices
from sim.model import build_model, helper_grads, is_mlp_sliced, local_shapes, mlp_layer
from sim.tiers import layer_widths
from sim.wire import Payload, Rejection, decode_payload, encode_payload

fractions = st.floats(0.0, 1.0, allow_nan=False)
intervals = st.integers(1, 8)


@st.composite
def draws(draw):
    (full, tier), layer = draw(widths_and_tiers(max_halvings=7)), draw(st.integers(0, 63))
    return full, full >> tier, draw(fractions), draw(SEEDS), draw(st.integers(0, 10**6)), layer, draw(intervals)


@given(draws())
def test_helper_indices_are_sorted_unique_and_inside_the_full_width_suffix(case):
    """Catches: indices drawn from the local width (Psyche's out-of-bounds at tier 1+), from
    [0, I) overlapping the prefix, duplicates, unsorted indices, a count other than round(f * width)."""
    full, width, fraction, seed, round_, layer, interval = case
    indices = helper_indices(seed, round_, layer, width, full, fraction, interval)
    assert indices.dtype == torch.int64 and indices.ndim == 1
    assert indices.numel() == min(round(fraction * width), full - width)
    assert bool((indices >= width).all() and (indices < full).all())
    assert bool((indices[1:] > indices[:-1]).all())


@given(draws(), st.data())
def test_helper_indices_are_a_pure_function_of_seed_epoch_and_layer(case, data):
    """Every peer computes the same indices with no communication, and they stay fixed within
    a rotation epoch. Catches: global RNG state, a per-peer seed, rotation every round."""
    full, width, fraction, seed, round_, layer, interval = case
    first = helper_indices(seed, round_, layer, width, full, fraction, interval)
    _suffix_order.cache_clear()  # another peer: nothing shared but the arguments
    torch.manual_seed(data.draw(SEEDS))
    same_epoch = (round_ // interval) * interval + data.draw(st.integers(0, interval - 1))
    assert torch.equal(first, helper_indices(seed, same_epoch, layer, width, full, fraction, interval))


@given(draws())
def test_consecutive_epochs_cover_the_whole_suffix(case):
    """ceil(suffix / count) consecutive epochs, from any epoch on, train every suffix neuron.
    Catches: a window that does not slide, or slides by the wrong step and skips neurons."""
    full, width, fraction, seed, round_, layer, interval = case
    count = helper_count(width, full, fraction)
    if count == 0:
        return
    epochs = math.ceil((full - width) / count)
    first = round_ // interval
    seen = torch.cat([helper_indices(seed, (first + e) * interval, layer, width, full, fraction, interval)
                      for e in range(epochs)])
    assert set(seen.tolist()) == set(range(width, full))


@st.composite
def helper_models(draw):
    cfg = draw(model_configs())
    tiers = draw(layer_tier_maps(cfg.intermediate_size, cfg.num_hidden_layers))
    return cfg, tiers, draw(fractions), draw(SEEDS), draw(st.integers(0, 100)), draw(st.integers(1, 3))


def inactive(n: int, active: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[active] = False
    return mask.nonzero().view(-1)


@scaled(0.5)
@given(helper_models())
def test_helper_grads_equal_the_dense_grads_of_those_neurons_and_nothing_else_moves(case):
    """A peer at a tier with helper neurons vs a full-width model whose other neurons are
    zeroed out (so they contribute nothing): same loss, equal gradients on the prefix and
    on the helper neurons, and the helper slab equals the dense gradient at those neurons.
    Neurons neither in the prefix nor helpers are NaN-poisoned in the peer's model first and
    must get exactly zero gradient. Catches: gathering the wrong rows (or columns of down), a
    helper gradient read from the local width, slabs in the wrong order, leakage."""
    cfg, tiers, fraction, seed, round_, batch = case
    widths = layer_widths(cfg.intermediate_size, tiers, cfg.num_hidden_layers)
    helpers = {layer: helper_indices(seed, round_, layer, width, cfg.intermediate_size, fraction, 2)
               for layer, width in enumerate(widths)}
    peer = build_model(cfg, tiers, seed=seed, device="cpu", dtype=torch.float64)
    reference = build_model(cfg, 0, seed=seed, device="cpu", dtype=torch.float64)
    active = {layer: torch.cat([torch.arange(w), helpers[layer]]) for layer, w in enumerate(widths)}
    with torch.no_grad():
        for (name, p), q in zip(peer.named_parameters(), reference.parameters()):
            if is_mlp_sliced(name):
                rest = inactive(p.shape[prefix_dim(name)], active[mlp_layer(name)])
                p.index_fill_(prefix_dim(name), rest, float("nan"))
                q.index_fill_(prefix_dim(name), rest, 0.0)
    peer.set_helpers(helpers)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(seed))
    losses = [m(tokens, tokens.roll(-1, dims=1))[1] for m in (peer, reference)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    slabs = helper_grads(peer)
    for (name, p), q in zip(peer.named_parameters(), reference.parameters()):
        if not is_mlp_sliced(name):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
            continue
        dim, live = prefix_dim(name), active[mlp_layer(name)]
        assert torch.count_nonzero(p.grad.index_select(dim, inactive(p.shape[dim], live))) == 0, name
        torch.testing.assert_close(p.grad.index_select(dim, live), q.grad.index_select(dim, live), rtol=1e-9, atol=1e-12)
        if helpers[mlp_layer(name)].numel():
            torch.testing.assert_close(slabs[name], q.grad.index_select(dim, helpers[mlp_layer(name)]),
                                       rtol=1e-9, atol=1e-12)
        else:
            assert name not in slabs


def sent_mask(sparse):
    """1 on the elements of a Sparse's tensor whose block sent something (not all absent)."""
    grid, mask = sparse.grid, torch.zeros(sparse.grid.shape)
    for block in torch.cartesian_prod(*(torch.arange(n) for n in grid.blocks)).view(-1, len(grid.blocks)).tolist():
        if bool((sparse.indices[tuple(block)] != grid.block_numel).any()):
            mask[tuple(slice(b * size, (b + 1) * size) for b, size in zip(block, grid.block))] = 1
    return mask


def reference_sums(payloads, shapes):
    """Sum, coverage and senders per element, the slow way: every payload decoded and placed
    alone, helper neurons placed one by one (those past the receiver's width dropped). A
    payload covers an element by its width; it sent it when the element's block is not all
    absent."""
    totals = {n: torch.zeros(s) for n, s in shapes.items()}
    covers = {n: torch.zeros(s) for n, s in shapes.items()}
    senders = {n: torch.zeros(s) for n, s in shapes.items()}
    for payload in payloads:
        for name, shape in shapes.items():
            dense = decompress(payload.params[name])
            if is_mlp_sliced(name):
                dense = align_prefix_grad(name, dense, shape)
                covers[name] += align_prefix_grad(name, torch.ones(payload.params[name].grid.shape), shape)
                senders[name] += align_prefix_grad(name, sent_mask(payload.params[name]), shape)
            else:
                covers[name] += 1
                senders[name] += sent_mask(payload.params[name])
            totals[name] += dense
        for name, slab in payload.helper_params.items():
            dim, dense = prefix_dim(name), decompress(slab)
            for j, neuron in enumerate(payload.helper_neurons[mlp_layer(name)].tolist()):
                if neuron >= shapes[name][dim]:
                    continue  # a narrower (sliced) receiver does not hold that neuron
                totals[name].select(dim, neuron).add_(dense.select(dim, j))
                covers[name].select(dim, neuron).add_(1)
    return totals, covers, senders


@pytest.mark.parametrize("semantics", list(MeanSemantics))
@scaled(0.25)
@given(helper_cases())
def test_helper_slabs_join_each_elements_mean_as_extra_contributors(semantics, case):
    """REGION_MEAN divides every element by everyone who covers it, helpers included;
    PEER_MEAN adds helper slabs to the sum over contributing peers; COEFF_MEAN merges them with
    the coefficient mean of the C payloads that sent the element's block as (C*U + sum) /
    (C + h). Catches: helpers not counted in REGION_MEAN's coverage, slabs placed at local
    positions or on the wrong axis, a helper counted as a contributing peer, C counting a
    payload whose block there was all absent (it would weigh U as if that payload had sent it)."""
    model, distro, payloads, receiver_tiers = case
    shapes = local_shapes(model, receiver_tiers)
    got = aggregate(payloads, shapes, distro, semantics)
    assert got.contributing_peers == len(payloads) and not got.rejected
    totals, covers, _ = reference_sums(payloads, shapes)
    plain = [Payload(p.peer, p.round, p.tiers, p.params, p.quantized) for p in payloads]
    base = aggregate(plain, shapes, distro, semantics).updates
    plain_totals, plain_covers, plain_senders = reference_sums(plain, shapes)
    for name, shape in shapes.items():
        if semantics is MeanSemantics.PEER_MEAN:
            expected = totals[name] / len(payloads)
        elif semantics is MeanSemantics.REGION_MEAN:
            expected = torch.where(covers[name] > 0, totals[name] / covers[name].clamp(min=1), 0.0)
        else:
            c, h, helper_sum = plain_senders[name], covers[name] - plain_covers[name], totals[name] - plain_totals[name]
            expected = torch.where(c + h > 0, (c * base[name] + helper_sum) / (c + h).clamp(min=1), 0.0)
        torch.testing.assert_close(got.updates[name], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@given(helper_cases(max_peers=1))
def test_helper_payloads_round_trip_the_wire_bit_exact(case):
    """Catches: helper slabs or neurons dropped, reordered, or attached to the wrong layer."""
    model, distro, (payload,), _ = case
    decoded = decode_payload(encode_payload(payload, distro.compression_chunk), model, distro)
    assert isinstance(decoded, Payload), decoded
    assert decoded.helper_neurons.keys() == payload.helper_neurons.keys()
    for layer, neurons in payload.helper_neurons.items():
        assert decoded.helper_neurons[layer].dtype == torch.int64  # torch.equal compares across dtypes
        assert torch.equal(decoded.helper_neurons[layer], neurons)
    assert decoded.helper_params.keys() == payload.helper_params.keys()
    for name, slab in payload.helper_params.items():
        assert torch.equal(decoded.helper_params[name].indices, slab.indices.long())
        assert torch.equal(decoded.helper_params[name].values, slab.values.float())


@pytest.mark.parametrize("flaw", ["into_the_prefix", "past_the_width", "unsorted", "repeated"])
@given(helper_cases(max_peers=1))
def test_helper_neurons_outside_the_senders_suffix_are_rejected(flaw, case):
    """Catches: a receiver trusting helper indices (a neuron in the sender's own prefix would be
    counted twice, one past I would write out of bounds)."""
    model, distro, (payload,), _ = case
    layer = next((l for l, n in payload.helper_neurons.items() if n.numel() >= (2 if flaw in ("unsorted", "repeated") else 1)), None)
    if layer is None:
        return
    neurons = payload.helper_neurons[layer].clone()
    width = layer_widths(model.intermediate_size, payload.tiers, model.num_hidden_layers)[layer]
    if flaw == "into_the_prefix":
        neurons[0] = width - 1
    elif flaw == "past_the_width":
        neurons[-1] = model.intermediate_size
    elif flaw == "unsorted":
        neurons[[0, 1]] = neurons[[1, 0]]
    else:
        neurons[1] = neurons[0]
    payload.helper_neurons[layer] = neurons
    result = decode_payload(encode_payload(payload, distro.compression_chunk), model, distro)
    says = "not sorted and unique" if flaw in ("unsorted", "repeated") else "outside its layer's suffix [width, I)"
    assert isinstance(result, Rejection) and result.reason == "bad_helper" and says in result.detail, result
