"""Training data: deterministic shards per (seed, round, peer).

Default source: a random Markov chain over a small vocabulary. Each state
moves to a few successors with random probabilities, so its entropy rate,
H = -sum_i pi_i sum_j P_ij log P_ij (nats, pi the stationary distribution),
is well below log(vocab) and known exactly: it is the loss floor no model can
beat on this data. Optional source: bytes of a local file.
"""
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sim.errors import ConfigError

MARKOV_STATES = 64
SUCCESSORS = 4


def _generator(*key: int) -> torch.Generator:
    """A generator seeded from the whole key, so (seed, round, peer) never collide."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class MarkovSource:
    transitions: torch.Tensor   # [S, S], rows sum to 1 (float64)
    stationary: torch.Tensor    # [S]

    @classmethod
    def random(cls, vocab_size: int, seed: int) -> "MarkovSource":
        states = min(vocab_size, MARKOV_STATES)
        gen = _generator(seed, -1)
        transitions = torch.zeros(states, states, dtype=torch.float64)
        for state in range(states):
            successors = torch.randperm(states, generator=gen)[:min(SUCCESSORS, states)]
            transitions[state, successors] = torch.rand(len(successors), generator=gen, dtype=torch.float64) + 0.1
        transitions /= transitions.sum(1, keepdim=True)
        # Mix in a little uniform mass so the chain is ergodic and pi is unique.
        transitions = 0.98 * transitions + 0.02 / states
        stationary = torch.full((states,), 1.0 / states, dtype=torch.float64)
        for _ in range(10_000):
            updated = stationary @ transitions
            if torch.allclose(updated, stationary, atol=1e-15, rtol=0):
                break
            stationary = updated
        return cls(transitions, stationary / stationary.sum())

    @property
    def entropy_rate(self) -> float:
        p = self.transitions
        return float(-(self.stationary * (p * p.log()).sum(1)).sum())

    def sample(self, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
        tokens = torch.empty(batch, length, dtype=torch.long)
        tokens[:, 0] = torch.multinomial(self.stationary, batch, replacement=True, generator=gen)
        for t in range(1, length):
            tokens[:, t] = torch.multinomial(self.transitions[tokens[:, t - 1]], 1, generator=gen).squeeze(1)
        return tokens


@dataclass(frozen=True)
class ByteCorpus:
    data: torch.Tensor  # uint8 bytes

    @classmethod
    def load(cls, path: str | Path, vocab_size: int) -> "ByteCorpus":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"data_location {str(path)!r} is not a file: give a local text/byte file or \"Dummy\"")
        if vocab_size < 256:
            raise ConfigError(f"a byte corpus needs vocab_size >= 256, the model has {vocab_size}")
        raw = path.read_bytes()
        if len(raw) < 2:
            raise ConfigError(f"data_location {str(path)!r} holds {len(raw)} bytes: too few to train on")
        return cls(torch.frombuffer(bytearray(raw), dtype=torch.uint8))

    @property
    def entropy_rate(self) -> float:
        """Unigram byte entropy: an upper bound on the true rate, not a floor."""
        counts = torch.bincount(self.data.long(), minlength=256).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())

    def sample(self, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
        span = len(self.data) - length
        if span < 1:
            raise ConfigError(f"the byte corpus ({len(self.data)} bytes) is shorter than a sequence of {length}")
        starts = torch.randint(0, span, (batch,), generator=gen)
        return torch.stack([self.data[s:s + length].long() for s in starts.tolist()])


def make_source(data_location: str, vocab_size: int, seed: int):
    return MarkovSource.random(vocab_size, seed) if data_location == "Dummy" else ByteCorpus.load(data_location, vocab_size)


def shard(source, seed: int, round_: int, peer: int, batch: int, length: int) -> torch.Tensor:
    """The tokens peer `peer` trains on in round `round_`: the same on every call."""
    return source.sample(batch, length, _generator(seed, round_, peer))


def uniform_loss(vocab_size: int) -> float:
    return math.log(vocab_size)
