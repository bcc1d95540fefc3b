"""Training data: deterministic sequences per (seed, data index), and a held-out batch.

Default source: a random order-k Markov chain over a small vocabulary. The
next token depends on the last k: each context (k tokens) moves to a few
successors with random probabilities, so the entropy rate,
H = -sum_c pi_c sum_j P_cj log P_cj (nats, pi the stationary distribution over
contexts), is well below log(vocab) and known exactly: it is the loss floor no
model can beat on this data.

Why order 2 for the runs that judge convergence: a first-order chain is a
bigram table, which the embedding and the head learn on their own; a model
whose FFN is cut to a quarter learns it as well. The next token of an order-2
chain is a random function of a pair of tokens: attention can bring the
previous token next to the current one, but turning the pair into its
successors is a lookup that only the FFN's neurons hold, one context per
neuron or so. With more contexts than a narrow tier has neurons, only the
full width can approach the floor (README: "Data that needs the FFN").
Optional source: bytes of a local file.
"""
import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sim.errors import ConfigError


@dataclass(frozen=True)
class MarkovSpec:
    """The synthetic source behind data_location = "Dummy" ([matsim.data] in state.toml)."""
    order: int = 1           # tokens of context
    states: int = 64         # tokens used (at most the vocabulary)
    successors: int = 4      # tokens each context can move to
    seed: int | None = None  # the chain's own seed: one task for every run seed (None: drawn from the run's seed)

    def __post_init__(self):
        for name in ("order", "states", "successors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"[matsim.data] {name} {value!r} is invalid: expected an integer >= 1")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ConfigError(f"[matsim.data] seed {self.seed!r} is invalid: expected an integer >= 0")
        if self.states ** self.order > 2 ** 20:
            raise ConfigError(f"[matsim.data] states ** order = {self.states}**{self.order} contexts is too many "
                              f"to tabulate: at most 2**20")


def _generator(*key: int) -> torch.Generator:
    """A generator seeded from the whole key, so (seed, round, peer) never collide."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class MarkovSource:
    transitions: torch.Tensor   # [S**order, S]: row c is P(next | context c), float64, rows sum to 1
    stationary: torch.Tensor    # [S**order]: the stationary distribution over contexts
    order: int = 1

    @functools.cached_property
    def _cdfs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative distributions to sample by inverse CDF: the stationary one, each row's."""
        return self.stationary.cumsum(0), self.transitions.cumsum(1)

    @classmethod
    def random(cls, vocab_size: int, seed: int, spec: MarkovSpec = MarkovSpec()) -> "MarkovSource":
        states = min(vocab_size, spec.states)
        contexts = states ** spec.order
        gen = _generator(seed if spec.seed is None else spec.seed, -1)
        transitions = torch.zeros(contexts, states, dtype=torch.float64)
        for context in range(contexts):
            successors = torch.randperm(states, generator=gen)[:min(spec.successors, states)]
            transitions[context, successors] = torch.rand(len(successors), generator=gen, dtype=torch.float64) + 0.1
        transitions /= transitions.sum(1, keepdim=True)
        # Mix in a little uniform mass so the chain is ergodic and pi is unique.
        transitions = 0.98 * transitions + 0.02 / states
        # Context c = (x_1 .. x_k) read as base-S digits, oldest first: after token j it is (c * S + j) mod S**k.
        following = (torch.arange(contexts)[:, None] * states + torch.arange(states)) % contexts
        stationary = torch.full((contexts,), 1.0 / contexts, dtype=torch.float64)
        for _ in range(100_000):
            if spec.order == 1:
                updated = stationary @ transitions
            else:
                updated = torch.zeros_like(stationary).index_add_(
                    0, following.reshape(-1), (stationary[:, None] * transitions).reshape(-1))
            if torch.allclose(updated, stationary, atol=1e-15, rtol=0):
                break
            stationary = updated
        return cls(transitions, stationary / stationary.sum(), spec.order)

    @property
    def states(self) -> int:
        return self.transitions.shape[1]

    @property
    def entropy_rate(self) -> float:
        p = self.transitions
        return float(-(self.stationary * (p * p.log()).sum(1)).sum())

    def sample(self, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
        return self.from_uniform(self.uniform(batch, length, gen))

    @staticmethod
    def uniform(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """The draws `sample` consumes, [length, batch]: position-major, so each row is contiguous."""
        return torch.rand(length, batch, generator=gen, dtype=torch.float64)

    def from_uniform(self, uniform: torch.Tensor) -> torch.Tensor:
        """Sequences [batch, length] by inverse CDF from draws [length, batch]: one call per
        position, whatever the batch (so many peers' shards cost one pass)."""
        S, k = self.states, self.order
        start, rows = self._cdfs
        length, batch = uniform.shape
        tokens = torch.empty(batch, length, dtype=torch.long)
        context = torch.searchsorted(start, uniform[0]).clamp_(max=start.numel() - 1)
        first = min(k, length)
        for i in range(first):   # the context's digits, oldest first
            tokens[:, i] = context // S ** (k - 1 - i) % S
        for t in range(first, length):
            tokens[:, t] = torch.searchsorted(rows[context], uniform[t].unsqueeze(1)).squeeze(1).clamp_(max=S - 1)
            context = (context * S + tokens[:, t]) % S ** k
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


def make_source(data_location: str, vocab_size: int, seed: int, markov: MarkovSpec = MarkovSpec()):
    if data_location == "Dummy":
        return MarkovSource.random(vocab_size, seed, markov)
    return ByteCorpus.load(data_location, vocab_size)


def sequences(source, seed: int, indices: Sequence[int], length: int) -> torch.Tensor:
    """The sequences at data indices `indices` of a run of `seed`, [len(indices), length]:
    each a function of (seed, its index) alone, so a round's assignment decides who trains
    a sequence, never what it holds (sim/assignment.py). A Markov source samples them all
    in one pass."""
    if not isinstance(source, MarkovSource):
        return torch.stack([source.sample(1, length, _generator(seed, "sequence", i))[0] for i in indices])
    if not len(indices):
        return torch.empty(0, length, dtype=torch.long)
    draws = torch.cat([source.uniform(1, length, _generator(seed, "sequence", i)) for i in indices], dim=1)
    return source.from_uniform(draws)


EVAL_SEQUENCES = 16   # at least: the loss a criterion reads is then a measurement, not noise


def held_out_count(global_batch_size: int) -> int:
    """Sequences in a run's held-out batch: a global batch, and never fewer than EVAL_SEQUENCES."""
    return max(EVAL_SEQUENCES, global_batch_size)


def held_out(source, task: int, count: int, length: int) -> torch.Tensor:
    """The batch every evaluation of a run reads: drawn under a key no data index has."""
    return source.sample(count, length, _generator(task, -1, -1))


def uniform_loss(vocab_size: int) -> float:
    return math.log(vocab_size)
