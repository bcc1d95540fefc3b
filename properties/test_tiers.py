"""Tier-width laws (sim/tiers.py)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import intermediate_sizes, invalid_tiers, widths_and_tiers
from sim.errors import ConfigError
from sim.tiers import layer_tiers, max_tier, tier_width, width_tier


@given(widths_and_tiers())
def test_tier_width_halves_exactly_and_inverts(case):
    """Catches: rounding a width that does not divide, or an off-by-one in the halving."""
    size, tier = case
    width = tier_width(size, tier)
    assert width >= 1 and width << tier == size and width_tier(size, width) == tier


@given(st.data(), intermediate_sizes())
def test_invalid_tiers_raise_config_error_naming_the_tier_and_the_valid_range(data, size):
    """Catches: a tier too deep silently floored to width 0 or rounded."""
    tier = data.draw(invalid_tiers(size))
    with pytest.raises(ConfigError) as raised:
        tier_width(size, tier)
    assert f"tier {tier}" in str(raised.value) and f"0..{max_tier(size)}" in str(raised.value)


@given(st.integers(0, 6), st.integers(1, 8), st.integers(1, 8))
def test_per_layer_tier_maps_must_have_one_tier_per_layer(tier, layers, given_count):
    """Catches: a short per-layer map silently reused or truncated."""
    assert layer_tiers(tier, layers) == (tier,) * layers
    if given_count == layers:
        assert layer_tiers([tier] * given_count, layers) == (tier,) * layers
    else:
        with pytest.raises(ConfigError, match=f"exactly {layers}"):
            layer_tiers([tier] * given_count, layers)
