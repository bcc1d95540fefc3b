"""Checkpoint and schema laws (sim/checkpoint.py, sim/schema.py)."""
import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from properties.profiles import scaled
from properties.strategies import model_configs
from sim.checkpoint import LOAD_STRATEGIES, export_tiers, load_checkpoint, save_checkpoint
from sim.errors import ConfigError, DoubleSlicingError, SimError
from sim.model import MatFormerLM, build_model, load_prefix
from sim.schema import checkpoint_schema_hash, schema_hash


@st.composite
def saved_models(draw):
    cfg = draw(model_configs())
    tier = draw(st.integers(0, cfg.max_tier))
    return cfg, tier, draw(st.integers(0, 2**16))


def exported_at(full: Path, tier: int, out: Path | None) -> Path:
    """The checkpoint of tier `tier`: an export (`<name>-tier<t>` in `out`, default beside
    `full`), or the full one at tier 0."""
    return full if tier == 0 else export_tiers(full, [tier], out)[0]


def loads(directory, tier: int, strategy: str):
    """The model a valid checkpoint loads as: that it loads at all is part of every law here."""
    try:
        return load_checkpoint(directory, tier, strategy, device="cpu")[0]
    except SimError as err:
        raise AssertionError(f"{directory} does not load at tier {tier} with {strategy!r}: {err}") from err


def same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@scaled(0.5)
@given(saved_models())
def test_save_then_load_is_bit_exact(case):
    """Catches: dtype casts, a dropped tied head, metadata that names the wrong width."""
    cfg, tier, seed = case
    widths = [cfg.intermediate_size >> tier] * cfg.num_hidden_layers
    model = build_model(cfg, tier, seed=seed, device="cpu", stored_widths=widths)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, Path(tmp) / "ckpt")
        loaded, info = load_checkpoint(Path(tmp) / "ckpt", tier, device="cpu")
    assert same_state(loaded, model) and loaded.layer_tiers == model.layer_tiers
    assert info.stored_tier == tier and info.sliced == (tier > 0)


@scaled(0.5)
@given(saved_models())
def test_slicing_commutes_with_export(case):
    """load(export(full, t)) == load(full) sliced to t. Catches: exporting the suffix, slicing
    down_proj's rows, or a second slice at load (the double-slicing bug)."""
    cfg, tier, seed = case
    full = build_model(cfg, 0, seed=seed, device="cpu")
    narrow = MatFormerLM(cfg, stored_widths=[cfg.intermediate_size >> tier] * cfg.num_hidden_layers)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(full, Path(tmp) / "full")
        exported = exported_at(Path(tmp) / "full", tier, Path(tmp) / "out")
        via_export, _ = load_checkpoint(exported, tier, device="cpu")
        loaded_full, _ = load_checkpoint(Path(tmp) / "full", tier, "universal", device="cpu")
    assert same_state(via_export, load_prefix(narrow, loaded_full.state_dict()))


@scaled(0.5)
@given(saved_models(), st.data())
def test_schema_hash_is_the_same_for_every_tier_export_and_load_strategy(case, data):
    """The chapter's check: a full checkpoint and its tier exports hash alike.
    Catches: a hash over the stored (sliced) shapes, or one that includes the tier."""
    cfg, tier, seed = case
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(build_model(cfg, 0, seed=seed, device="cpu"), Path(tmp) / "full")
        exported = exported_at(Path(tmp) / "full", tier, None)   # beside it: where each strategy looks
        strategy = data.draw(st.sampled_from(LOAD_STRATEGIES))
        model = loads(Path(tmp) / "full", tier, strategy)   # as Psyche's client names it: the base, and a tier
        hashes = {checkpoint_schema_hash(Path(tmp) / "full"), checkpoint_schema_hash(exported), schema_hash(model.cfg)}
    assert len(hashes) == 1


# The last three change no shape, only what the model computes: peers must agree on them too.
ARCHITECTURE_FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "intermediate_size", "vocab_size", "style", "tie_word_embeddings", "mlp_bias",
                       "rope_theta", "rms_norm_eps", "max_position_embeddings"]


@given(model_configs(), st.sampled_from(ARCHITECTURE_FIELDS), st.data())
def test_schema_hash_changes_with_every_architecture_field(cfg, field, data):
    """Catches: a hash that forgets a field, so incompatible peers would look compatible.
    (Most fields also change a shape; rope_theta, rms_norm_eps and max_position_embeddings do not.)"""
    current = getattr(cfg, field)
    if isinstance(current, bool):
        value = not current
    elif field == "style":
        value = "llama" if current == "nanogpt" else "nanogpt"
    elif isinstance(current, float):
        value = data.draw(st.floats(1e-8, 1e6).filter(lambda v: v != current))
    else:
        value = data.draw(st.integers(1, 64).filter(lambda v: v != current))
    try:
        changed = dataclasses.replace(cfg, **{field: value})
    except ConfigError:
        assume(False)
    assert schema_hash(changed) != schema_hash(cfg)


@scaled(0.5)
@given(saved_models().filter(lambda case: case[0].max_tier >= 1), st.data())
def test_universal_on_a_sliced_checkpoint_raises_double_slicing(case, data):
    """A checkpoint exported at tier s > 0, loaded `universal` at any tier t > 0, would be
    sliced a second time: DoubleSlicingError. `auto` and `sliced` hold the stored widths.
    Catches: metadata ignored (the stored width read as the base width), the check skipped."""
    cfg, _, seed = case
    stored = data.draw(st.integers(1, cfg.max_tier))
    tier = data.draw(st.integers(1, cfg.max_tier))
    full = build_model(cfg, 0, seed=seed, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(full, Path(tmp) / "full")
        (exported,) = export_tiers(Path(tmp) / "full", [stored], Path(tmp) / "out")
        with pytest.raises(SimError) as refused:
            load_checkpoint(exported, tier, "universal", device="cpu")
        assert isinstance(refused.value, DoubleSlicingError) and f"already sliced to tier {stored}" in str(refused.value), \
            f"universal at tier {tier} on an export of tier {stored}: {refused.value!r}"
        loaded, info = load_checkpoint(exported, max(tier, stored), "auto", device="cpu")
    assert info.sliced and info.stored_tier == stored
    assert loaded.stored_widths == (cfg.intermediate_size >> stored,) * cfg.num_hidden_layers
