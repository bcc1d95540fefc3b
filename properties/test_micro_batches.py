"""Psyche's micro-batches (sim/peer.py): a trainer's batch split as its trainer splits it,
gradients accumulated over the pieces."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import model_configs
from sim.config import load_config
from sim.memory import largest_piece
from sim.model import build_model, random_tokens
from sim.peer import gradients, micro_batches
from sim.run import Network

TINY = load_config("tiny")


@given(st.integers(1, 40), st.integers(1, 40))
def test_the_split_is_ceil_b_over_m_pieces_of_torchs_chunk(batch, micro):
    """Psyche's trainer: steps = ceil(B / m), then tensor.chunk(steps): pieces of ceil(B / steps),
    the last smaller; no piece larger than m, none empty, every sequence once, in order."""
    tokens = torch.arange(batch).view(batch, 1)
    pieces = micro_batches(tokens, micro)
    steps = math.ceil(batch / micro) if micro < batch else 1
    assert torch.equal(torch.cat(pieces), tokens) and all(len(p) for p in pieces)
    assert max(len(p) for p in pieces) == largest_piece(batch, micro) <= micro
    assert len(pieces) <= steps and [len(p) for p in pieces] == [len(p) for p in tokens.chunk(steps, 0)]


@given(model_configs(max_layers=2), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**16))
def test_accumulated_micro_batches_weigh_each_piece_by_one_over_their_count_and_equal_the_whole_batch_when_even(
        cfg, batch, micro, seed):
    """Each piece's mean loss over the number of pieces (Psyche's loss_scale): the accumulated
    gradient is the mean of the pieces' gradients, which is the whole batch's exactly when the
    pieces are equal (float64, 1e-12). Catches: pieces summed without the scale, divided by the
    batch size, a piece dropped or trained twice."""
    model = build_model(cfg, 0, seed=seed, device="cpu", dtype=torch.float64)
    tokens = random_tokens(cfg, batch, 5, seed, device="cpu")
    accumulated, (loss,) = gradients([model], tokens.unsqueeze(0), micro)
    accumulated = {name: g[0].clone() for name, g in accumulated.items()}
    pieces = micro_batches(tokens, micro)
    expected = {name: torch.zeros_like(g) for name, g in accumulated.items()}
    for piece in pieces:
        part, (piece_loss,) = gradients([model], piece.unsqueeze(0), None)
        for name, g in part.items():
            expected[name] += g[0] / len(pieces)
    for name, g in accumulated.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-12, atol=1e-12)
    if len({len(p) for p in pieces}) == 1:
        whole, (whole_loss,) = gradients([model], tokens.unsqueeze(0), None)
        assert math.isclose(loss, whole_loss, rel_tol=1e-12)
        for name, g in accumulated.items():
            torch.testing.assert_close(g, whole[name][0], rtol=1e-12, atol=1e-12)


@given(st.integers(1, 20), st.integers(0, 2**16))
def test_the_held_out_loss_is_the_mean_over_all_its_tokens_whatever_the_micro_batch_size(micro, seed):
    """The evaluation puts the held-out batch (16 sequences) through in micro-batches, since its
    logits at once may not fit: each piece's mean weighs by its share of the tokens, so the loss
    is the whole batch's (float64, 1e-12) for any split, unequal pieces included. Catches:
    pieces averaged with equal weights, a piece dropped or counted twice."""
    whole = Network(TINY, [0], seed=seed, device="cpu", dtype=torch.float64).eval_loss()
    split = Network(TINY.replace(micro_batch_size=micro), [0], seed=seed, device="cpu", dtype=torch.float64)
    assert math.isclose(split.eval_loss(), whole, rel_tol=1e-12)
