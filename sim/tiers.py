"""Tier widths: tier t keeps the first `I >> t` neurons of every FFN.

A tier is valid for base width I when I is divisible by 2**t (so the width
is exact, never rounded) and the width is at least 1. A peer may carry one
tier per layer (Mix'n'Match); a single tier is the case where all agree.
"""
from collections.abc import Sequence

from sim.errors import ConfigError


def max_tier(intermediate_size: int) -> int:
    """Deepest valid tier: the number of times I halves exactly."""
    if not isinstance(intermediate_size, int) or isinstance(intermediate_size, bool) or intermediate_size < 1:
        raise ConfigError(f"intermediate_size {intermediate_size!r} is invalid: expected an integer >= 1")
    return (intermediate_size & -intermediate_size).bit_length() - 1


def tier_width(intermediate_size: int, tier: int) -> int:
    """FFN width of `tier` for base width `intermediate_size`, validated."""
    deepest = max_tier(intermediate_size)
    if not isinstance(tier, int) or isinstance(tier, bool):
        raise ConfigError(f"tier {tier!r} is not an integer: valid tiers for intermediate_size "
                          f"{intermediate_size} are 0..{deepest}")
    if tier < 0:
        raise ConfigError(f"tier {tier} is negative: valid tiers for intermediate_size "
                          f"{intermediate_size} are 0..{deepest}")
    if tier > deepest:
        raise ConfigError(f"tier {tier} is too deep for intermediate_size {intermediate_size} "
                          f"({intermediate_size} is not divisible by 2**{tier}): valid tiers are 0..{deepest}")
    return intermediate_size >> tier


def layer_tiers(tiers: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Normalize a single tier or a per-layer tier map to one tier per layer."""
    if isinstance(tiers, int) and not isinstance(tiers, bool):
        return (tiers,) * num_layers
    tiers = tuple(tiers)
    if len(tiers) != num_layers:
        raise ConfigError(f"got {len(tiers)} per-layer tiers {list(tiers)} for a model with "
                          f"{num_layers} layers: give one tier, or exactly {num_layers}")
    return tiers


def layer_widths(intermediate_size: int, tiers: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """FFN width of every layer for a (per-layer) tier assignment, validated."""
    return tuple(tier_width(intermediate_size, t) for t in layer_tiers(tiers, num_layers))


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """'0,1,1' -> (0, 1, 1), with a ConfigError naming `what` on bad input."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of integers, e.g. 0,1,1") from None


def parse_client_tiers(text: str, what: str = "--client-matformer-tiers") -> tuple:
    """'0,1:2,1' -> (0, (1, 2), 1): one entry per client, a colon-separated entry giving
    that client one tier per layer (Mix'n'Match)."""
    try:
        return tuple(int(part) if ":" not in part else tuple(int(t) for t in part.split(":"))
                     for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of tiers, e.g. 0,1,1 (or 0,1:2,1 "
                          f"for per-layer tiers)") from None


def width_tier(intermediate_size: int, width: int) -> int:
    """Inverse of tier_width: the tier whose width is `width`, or ConfigError."""
    deepest = max_tier(intermediate_size)
    for tier in range(deepest + 1):
        if intermediate_size >> tier == width:
            return tier
    valid = [intermediate_size >> t for t in range(deepest + 1)]
    raise ConfigError(f"FFN width {width!r} is not a tier width of intermediate_size {intermediate_size}: "
                      f"valid widths are {valid}")
