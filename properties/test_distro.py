"""DisTrO transform and state laws (sim/distro.py)."""
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import tensors
from sim.config import DistroConfig
from sim.distro import (ChunkGrid, DistroState, batch_decompress, chunk_size, coefficient_mean, coefficient_sum, compress,
                        decompress, top_k)
from sim.errors import ConfigError, ShapeMismatch

shapes = st.one_of(st.tuples(st.integers(1, 150)), st.tuples(st.integers(1, 150), st.integers(1, 150)))
chunks = st.integers(1, 70)


@given(st.integers(1, 5000), chunks)
def test_chunk_size_is_the_largest_divisor_not_above_the_chunk(n, chunk):
    """Catches: a chunk that does not divide (blocks overrun) or a needlessly small one."""
    c = chunk_size(n, chunk)
    assert n % c == 0 and c <= chunk and not any(n % d == 0 for d in range(c + 1, min(n, chunk) + 1))


@given(shapes, chunks, st.data())
def test_dct_round_trips_and_preserves_energy(shape, chunk, data):
    """Catches: a non-orthonormal basis (scaled updates), a wrong block permutation on decode."""
    grid = ChunkGrid.of(shape, chunk)
    x = data.draw(tensors(shape, dtype=torch.float64))
    coeffs = grid.encode(x)
    assert tuple(coeffs.shape) == (*grid.blocks, grid.block_numel)
    torch.testing.assert_close(grid.decode(coeffs), x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(coeffs.pow(2).sum(), x.pow(2).sum(), rtol=1e-10, atol=1e-10)


@given(shapes, chunks, st.integers(1, 12), st.data())
def test_topk_keeps_the_k_largest_coefficients_of_every_block(shape, chunk, topk, data):
    """Catches: a global instead of per-chunk top-k, smallest-k, or lost values."""
    x = data.draw(tensors(shape, dtype=torch.float64))
    sparse = compress(x, chunk, topk)
    grid, k = sparse.grid, min(topk, sparse.grid.block_numel)
    coeffs = grid.encode(x)
    kept = coefficient_mean(grid, sparse.indices, sparse.values)
    threshold = coeffs.abs().topk(k, dim=-1).values[..., -1:]
    assert torch.all((kept != 0).sum(-1) <= k)
    assert torch.equal(kept, torch.where(kept != 0, coeffs, 0.0))
    assert torch.all(coeffs.abs().where(kept == 0, 0.0) <= threshold + 1e-12)
    if k == grid.block_numel:
        torch.testing.assert_close(decompress(sparse), x, rtol=1e-10, atol=1e-10)


@given(st.integers(1, 40), st.integers(1, 6), st.sampled_from([torch.float32, torch.float64]), st.data())
def test_top_k_takes_the_largest_magnitudes_and_breaks_ties_to_the_lowest_index(n, values, dtype, data):
    """Coefficients from a few magnitudes, so that exact ties are common, in rows of n. The
    chosen set is the first k by (larger magnitude, then lower index): one rule, whatever
    order a kernel happens to find equal values in. Catches: ties left to topk (which two
    computations that differ in round-off break differently), a reversed index rule, a
    rank that drops the sign bit's neighbour (the exponent) or the magnitude."""
    k = data.draw(st.integers(1, n))
    levels = data.draw(st.lists(st.floats(1e-6, 1e6), min_size=values, max_size=values))
    picks = data.draw(st.lists(st.tuples(st.integers(0, values - 1), st.booleans(), st.booleans()), min_size=3 * n,
                               max_size=3 * n))
    coeffs = torch.tensor([(0.0 if zero else levels[i]) * (-1 if negative else 1) for i, negative, zero in picks],
                          dtype=dtype).view(3, n)
    chosen = top_k(coeffs, k)
    for row, picked in zip(coeffs.tolist(), chosen.tolist()):
        expected = sorted(range(n), key=lambda j: (-abs(row[j]), j))[:k]
        assert sorted(picked) == sorted(expected), (row, picked, expected)


@given(shapes, st.integers(1, 70), st.integers(1, 12), st.floats(0.0, 1.0), st.integers(1, 4), st.data())
def test_error_feedback_conserves_the_delta(shape, chunk, topk, decay, rounds, data):
    """delta before transmit == decoded transmitted part + residual, every round.
    Catches: dropped error feedback, subtracting the quantized signs, momentum applied twice."""
    state = DistroState.fresh(DistroConfig(decay, chunk, topk, quantize_1bit=True))
    for _ in range(rounds):
        grad = data.draw(tensors(shape, dtype=torch.float64))
        previous = state.delta.get("w", torch.zeros(shape, dtype=torch.float64)).clone()
        before = decay * previous + 0.1 * grad
        sent, transmitted = state.step("w", grad, lr=0.1)
        torch.testing.assert_close(transmitted + state.delta["w"], before, rtol=1e-10, atol=1e-12)
        assert set(sent.values.unique().tolist()) <= {-1.0, 0.0, 1.0}
        coefficients = sent.grid.encode(transmitted).gather(-1, sent.indices.clamp(max=sent.grid.block_numel - 1))
        # Where a coefficient is round-off of an exact 0 (a DCT of [0, 1, 0, ...] has some), its
        # re-encoded sign is noise: compare the signs that are clear of it. Below the smallest
        # normal float there is no relative precision at all (a decay of 1e-311 makes the whole
        # delta subnormal), so nothing there is clear.
        noise = max(1e-12 * before.abs().max().item(), torch.finfo(before.dtype).tiny)
        clear = (sent.indices < sent.grid.block_numel) & (coefficients.abs() > noise)
        assert torch.equal(sent.values[clear], coefficients.sign()[clear])


def test_an_all_zero_block_sends_only_absent_slots():
    """Catches: 1-bit signs turning exact zeros into +-1 (unused embedding rows drifting)."""
    sparse = compress(torch.zeros(8, 8), chunk=8, topk=4)
    assert torch.all(sparse.indices == sparse.grid.block_numel)
    assert torch.count_nonzero(decompress(sparse)) == 0


small_shapes = st.one_of(st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 40), st.integers(1, 40)))


@given(small_shapes, st.integers(1, 16), st.integers(1, 8), st.data())
def test_sent_zero_blocks_go_out_at_their_lowest_indices_and_as_plus_one_under_one_bit(shape, chunk, topk, data):
    """zero_blocks "sent" (DeMo, Psyche): a block with fewer than k nonzero coefficients
    sends its nonzero ones and then zeros at the lowest free indices, which Psyche's 1-bit
    quantizer (the sign bit of +0.0 is clear) sends as +1; "absent" sends those nowhere.
    Catches: 1-bit zeros kept at 0 in Psyche's mode (its +1 pushes never modelled), zeros
    dropped to the absent slot in it, ties among zeros broken in another order."""
    x = torch.zeros(shape, dtype=torch.float64)
    x.view(-1)[: data.draw(st.integers(0, x.numel()))] = 1.0   # some blocks all zero, some not
    for mode in ("sent", "absent"):
        state = DistroState.fresh(DistroConfig(0.5, chunk, topk, quantize_1bit=True, zero_blocks=mode))
        sent, _ = state.step("w", x, lr=1.0)   # the first step's delta is x itself
        plain = compress(x, chunk, topk, zero_blocks=mode)
        numel, k = sent.grid.block_numel, sent.indices.shape[-1]
        zeros = plain.values == 0
        if mode == "absent":
            assert torch.equal(sent.indices == numel, zeros) and bool((sent.values[zeros] == 0).all())
            continue
        assert bool((sent.indices < numel).all())
        assert bool((sent.values[zeros] == 1).all()) and set(sent.values.unique().tolist()) <= {-1.0, 1.0}
        # A block's zero entries take the lowest indices its nonzero entries leave free.
        for idx, val in zip(sent.indices.reshape(-1, k), plain.values.reshape(-1, k)):
            taken = set(idx[val != 0].tolist())
            free = [i for i in range(numel) if i not in taken][: int((val == 0).sum())]
            assert sorted(idx[val == 0].tolist()) == free


@given(shapes, chunks, st.integers(0, 2), st.sampled_from(["mean", "sum"]), st.data())
def test_pair_decode_equals_decoding_the_scattered_coefficients(shape, chunk, lead, reduce, data):
    """decode_pairs builds blocks from (index, value) pairs; it must equal scattering them into
    dense coefficients (mean or sum over repeats, absent slot dropped) and decoding.
    Catches: the basis rows and columns swapped, repeats added under "mean", the absent slot
    decoded as a coefficient, a stack of tensors decoded out of order."""
    grid = ChunkGrid.of(shape, chunk)
    n = data.draw(st.integers(1, sum(grid.block)), label="pairs per block")  # both routes: pairs and dense
    pairs = (*[2] * lead, *grid.blocks, n)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, grid.block_numel + 1, pairs, generator=gen)  # repeats and absent slots
    values = torch.randn(pairs, generator=gen, dtype=torch.float64)
    scatter = coefficient_mean if reduce == "mean" else coefficient_sum
    torch.testing.assert_close(grid.decode_pairs(indices, values, reduce), grid.decode(scatter(grid, indices, values)),
                               rtol=1e-10, atol=1e-12)



@given(shapes, chunks, st.integers(1, 12), st.integers(2, 4), st.data())
def test_helper_residuals_restart_when_their_neurons_rotate_and_only_then(shape, chunk, topk, rounds, data):
    """A helper slab's rows are whatever neurons its anchor names: while the anchor stays, error
    feedback carries the residual as for any parameter; when it changes, the residual (which
    belongs to other neurons) is dropped. Catches: residuals kept across a rotation (landing on
    the wrong neurons), or dropped every round (no error feedback for helpers)."""
    state = DistroState.fresh(DistroConfig(0.5, chunk, topk, quantize_1bit=True))
    anchors = [torch.tensor([3, 5]), torch.tensor([3, 5]), torch.tensor([4, 6]), torch.tensor([4, 6])][:rounds]
    for anchor in anchors:
        grad = data.draw(tensors(shape, dtype=torch.float64))
        rotated = "helper:w" in state.anchors and not torch.equal(state.anchors["helper:w"], anchor)
        kept = state.delta.get("helper:w", torch.zeros(shape, dtype=torch.float64)).clone()
        before = 0.1 * grad if rotated or not state.delta else 0.5 * kept + 0.1 * grad
        _, transmitted = state.step("helper:w", grad, lr=0.1, anchor=anchor.clone())
        torch.testing.assert_close(transmitted + state.delta["helper:w"], before, rtol=1e-10, atol=1e-12)


@given(shapes, chunks, st.integers(1, 12), st.data())
def test_an_unquantized_step_sends_the_coefficients_themselves(shape, chunk, topk, data):
    """Catches: signs sent when quantize_1bit is off (every receiver's mean then loses magnitudes)."""
    state = DistroState.fresh(DistroConfig(0.0, chunk, topk, quantize_1bit=False))
    sent, transmitted = state.step("w", data.draw(tensors(shape, dtype=torch.float64)), lr=1.0)
    present = sent.indices < sent.grid.block_numel
    coefficients = sent.grid.encode(transmitted).gather(-1, sent.indices.clamp(max=sent.grid.block_numel - 1))
    torch.testing.assert_close(sent.values[present], coefficients[present], rtol=1e-10, atol=1e-12)


def test_pair_decode_names_a_reduce_it_does_not_know():
    grid = ChunkGrid.of((4, 4), 2)
    with pytest.raises(ConfigError, match=re.escape("reduce 'median' is unknown: valid are 'mean' and 'sum'")):
        grid.decode_pairs(torch.zeros(2, 2, 1, dtype=torch.long), torch.zeros(2, 2, 1), "median")


def test_batch_decompress_refuses_payloads_of_different_grids_naming_them():
    """Catches: the homogeneous fast path mixing blocks of different shapes."""
    a, b = compress(torch.ones(4, 4), 2, 1), compress(torch.ones(4, 8), 2, 1)
    with pytest.raises(ShapeMismatch, match=re.escape("batch_decompress needs one chunk grid, got [(4, 4), (4, 8)]")):
        batch_decompress([a, b])
