"""Helper mode: which suffix neurons a narrow peer also trains.

A tier-t peer with helper fraction f trains, in every layer, its prefix
[0, width_t) plus `round(f * width_t)` neurons of the full-width suffix
[width_t, I) (Psyche drew them from [0, I) and went out of bounds at tier 1+).
They are a window onto a fixed permutation of the suffix, drawn per
(seed, layer) from a counter-based generator (splitmix64 of the counter), and
the window slides by its own length every rotation epoch
(round // rotation_interval). Hence:
- every peer derives the same indices from (seed, round, layer) alone, with no
  communication, on any machine (integer arithmetic only);
- they are fixed within an epoch, sorted and unique;
- ceil(suffix / count) consecutive epochs cover the whole suffix.
"""
import functools

import numpy as np
import torch

from sim.errors import ConfigError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijection on uint64 that scrambles a counter into random bits."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def helper_count(width: int, full: int, fraction: float) -> int:
    """Suffix neurons a peer of FFN width `width` helps with: round(f * width), at most the suffix."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"helper fraction {fraction} is outside [0, 1]")
    return min(round(fraction * width), full - width)


@functools.lru_cache(maxsize=1024)
def _suffix_order(seed: int, layer: int, width: int, full: int) -> torch.Tensor:
    counters = np.arange(full - width, dtype=np.uint64)
    stream = _splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64) ^ _splitmix64(np.array([layer], dtype=np.uint64)))
    keys = _splitmix64(stream ^ counters)
    return torch.from_numpy(width + np.argsort(keys, kind="stable").astype(np.int64))


def rotation_epoch(round_: int, rotation_interval: int) -> int:
    if not isinstance(rotation_interval, int) or isinstance(rotation_interval, bool) or rotation_interval < 1:
        raise ConfigError(f"helper rotation interval {rotation_interval!r} is invalid: expected an integer >= 1")
    return round_ // rotation_interval


def helper_indices(seed: int, round_: int, layer: int, width: int, full: int, fraction: float,
                   rotation_interval: int) -> torch.Tensor:
    """Sorted int64 indices in [width, full): the suffix neurons of `layer` trained this round."""
    count = helper_count(width, full, fraction)
    epoch = rotation_epoch(round_, rotation_interval)
    if count == 0:
        return torch.empty(0, dtype=torch.int64)
    return epoch_window(_suffix_order(seed, layer, width, full), count, epoch)


def epoch_window(order: torch.Tensor, count: int, epoch: int) -> torch.Tensor:
    """The `count` entries of `order` that epoch `epoch` takes, sorted: the window slides by its
    own length each epoch and wraps around the end."""
    start = (epoch * count) % order.numel()
    return order[(start + torch.arange(count)) % order.numel()].sort().values
