"""Training data (sim/data.py)."""
import math

import pytest
import torch

from sim.data import ByteCorpus, MarkovSource, MarkovSpec, held_out, make_source, sequences
from sim.errors import ConfigError


def test_the_markov_entropy_rate_is_the_empirical_conditional_entropy():
    """The loss floor must be right, or 'within x of the floor' means nothing: the computed rate
    equals -mean log P(x_t | x_t-1) over a long sample (within 1%)."""
    source = MarkovSource.random(256, seed=0)
    tokens = source.sample(64, 2000, torch.Generator().manual_seed(1))
    logp = source.transitions[tokens[:, :-1], tokens[:, 1:]].log()
    assert -logp.mean().item() == pytest.approx(source.entropy_rate, rel=0.01)
    assert source.entropy_rate < 0.5 * math.log(64)


def test_a_sequence_is_a_function_of_the_seed_and_its_data_index_only():
    source = MarkovSource.random(64, seed=3)
    one = sequences(source, 3, [5], 17)
    assert torch.equal(one, sequences(source, 3, [5], 17)) and one.shape == (1, 17)
    others = [sequences(source, 3, [6], 17), sequences(source, 4, [5], 17)]
    assert all(not torch.equal(one, other) for other in others)


def test_the_held_out_batch_is_no_training_sequence():
    source = MarkovSource.random(64, seed=3)
    evaluation, training = held_out(source, 3, 16, 17), sequences(source, 3, range(64), 17)
    assert not any(torch.equal(row, seq) for row in evaluation for seq in training)


def test_a_byte_corpus_yields_byte_tokens_from_the_file(tmp_path):
    text = b"the quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "corpus.txt").write_bytes(text)
    source = make_source(str(tmp_path / "corpus.txt"), 256, seed=0)
    tokens = sequences(source, 0, range(4), 32)
    assert tokens.shape == (4, 32) and int(tokens.max()) < 256
    assert all(bytes(row.tolist()) in text for row in tokens)
    assert 0 < source.entropy_rate <= math.log(256)


@pytest.mark.parametrize("vocab, content, fragment", [
    (64, b"hello world", "vocab_size >= 256"),
    (256, b"x", "too few to train on"),
])
def test_a_bad_byte_corpus_is_a_config_error(tmp_path, vocab, content, fragment):
    (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(ConfigError, match=fragment):
        ByteCorpus.load(tmp_path / "c.txt", vocab)
    with pytest.raises(ConfigError, match="is not a file"):
        ByteCorpus.load(tmp_path / "missing.txt", 256)


@pytest.mark.parametrize("order", [1, 2])
def test_many_sequences_at_once_are_each_sequence_alone(order):
    """A group's sequences are drawn in one sampling pass: it must give every data index
    exactly the tokens it gets alone (else batching would change what a run trains on)."""
    source = MarkovSource.random(64, seed=3, spec=MarkovSpec(order=order, states=16))
    indices = [0, 5, 2, 7, 40]
    assert torch.equal(sequences(source, 3, indices, 17), torch.cat([sequences(source, 3, [i], 17) for i in indices]))
