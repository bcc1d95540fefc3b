"""Checkpoints: atomic saves, bad input, HF checkpoints, double slicing, helper mode, the CLI."""
import dataclasses
import json
import logging
import os

import pytest
import torch

from sim import checkpoint
from sim.checkpoint import export_tiers, load_checkpoint, save_checkpoint
from sim.config import load_config
from sim.errors import CheckpointError, ConfigError, DoubleSlicingError
from sim.model import build_model, random_tokens
from tests.cli import matsim_here

TINY = load_config("tiny").model


def tensors_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def full(tmp_path):
    model = build_model(TINY, seed=1, device="cpu")
    save_checkpoint(model, tmp_path / "full")
    return tmp_path / "full", tensors_of(model)


def test_an_interrupted_swap_leaves_the_previous_checkpoint_loadable(full, monkeypatch):
    path, before = full
    newer = build_model(TINY, seed=2, device="cpu")
    real_rename, calls = os.rename, []

    def crash_on_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut between the two renames")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(newer, path)
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    loaded, _ = load_checkpoint(path, device="cpu")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())


def test_an_interrupted_write_leaves_the_previous_checkpoint_in_place(full, monkeypatch):
    path, before = full

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint, "_fsync_write", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(build_model(TINY, seed=3, device="cpu"), path)
    loaded, _ = load_checkpoint(path, device="cpu")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())


def corrupt(path, how):
    weights, config = path / "model.safetensors", path / "config.json"
    hf = json.loads(config.read_text())
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "garbage":
        weights.write_bytes(b"\x00" * 64 + weights.read_bytes()[64:])
    elif how == "missing_config":
        config.unlink()
    elif how == "half_metadata":
        config.write_text(json.dumps({k: v for k, v in hf.items() if k != "matformer_base_intermediate_size"}))
    elif how == "contradictory_metadata":
        config.write_text(json.dumps({**hf, "matformer_tier": 1}))
    elif how == "tensors_disagree":
        config.write_text(json.dumps({**hf, "vocab_size": hf["vocab_size"] + 1}))


@pytest.mark.parametrize("how, fragment", [
    ("truncated", "not a valid safetensors file"),
    ("garbage", "not a valid safetensors file"),
    ("missing_config", "has no config.json"),
    ("half_metadata", "must be given together"),
    ("contradictory_metadata", "metadata contradicts itself"),
    ("tensors_disagree", "tensors disagree with config.json"),
])
def test_bad_checkpoints_raise_checkpoint_error(full, how, fragment):
    path, _ = full
    corrupt(path, how)
    with pytest.raises(CheckpointError, match=fragment):
        load_checkpoint(path, device="cpu")


def test_unknown_strategy_and_missing_path_are_typed_errors(tmp_path, full):
    with pytest.raises(ConfigError, match="valid strategies are auto, sliced, universal"):
        load_checkpoint(full[0], strategy="greedy")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_universal_on_a_sliced_checkpoint_is_double_slicing(full, tmp_path):
    (tier1,) = export_tiers(full[0], [1], tmp_path / "out")
    with pytest.raises(DoubleSlicingError, match="already sliced to tier 1.*would slice it again.*auto or sliced"):
        load_checkpoint(tier1, 1, "universal")
    model, info = load_checkpoint(tier1, 1, "auto", device="cpu")
    assert info.sliced and info.effective_tier == 1 and info.ffn_width == TINY.intermediate_size // 2


def test_helper_mode_is_auto_disabled_on_a_sliced_checkpoint_with_the_reason_logged(full, tmp_path, caplog):
    (tier1,) = export_tiers(full[0], [1], tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="sim.checkpoint"):
        _, info = load_checkpoint(tier1, 1, helper_fraction=0.5, device="cpu")
    assert not info.helper_mode and "sliced checkpoint holds no suffix" in info.helper_reason
    assert "helper mode auto-disabled" in caplog.text
    _, info = load_checkpoint(full[0], 1, helper_fraction=0.5, device="cpu")
    assert info.helper_mode


def test_reads_a_checkpoint_written_by_transformers_save_pretrained(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    hf = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    reference = LlamaForCausalLM(LlamaConfig(**hf)).eval()
    reference.save_pretrained(tmp_path / "hf")
    ours, info = load_checkpoint(tmp_path / "hf", device="cpu")
    tokens = random_tokens(cfg, 2, 8, seed=0, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], reference(tokens).logits, rtol=1e-5, atol=1e-5)
    (tier1,) = export_tiers(tmp_path / "hf", [1], tmp_path / "out")
    sliced, info = load_checkpoint(tier1, 1, device="cpu")
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(sliced.state_dict()[up], reference.state_dict()[up][: cfg.intermediate_size // 2])


def test_schema_hash_of_a_full_checkpoint_and_its_tier1_export_agree_from_the_cli(full, tmp_path):
    assert matsim_here("export-tiers", "--checkpoint", str(full[0]), "--tiers", "1,2", "--out", str(tmp_path / "out")).returncode == 0
    a = matsim_here("print-schema-hash", "--checkpoint", str(full[0]), "--matformer-tier", "0")
    b = matsim_here("print-schema-hash", "--checkpoint", str(tmp_path / "out" / "tier1"), "--matformer-tier", "1")
    assert a.returncode == b.returncode == 0 and len(a.stdout.strip()) == 64 and a.stdout == b.stdout


@pytest.mark.parametrize("argv, fragment", [
    (["print-schema-hash", "--checkpoint", "NOWHERE"], "does not exist"),
    (["print-schema-hash", "--checkpoint", "FULL", "--matformer-load-strategy", "greedy"], "invalid choice"),
    (["export-tiers", "--checkpoint", "FULL", "--tiers", "1,9", "--out", "OUT"], "tier 9 is too deep"),
    (["export-tiers", "--checkpoint", "TRUNCATED", "--tiers", "1", "--out", "OUT"], "not a valid safetensors"),
])
def test_cli_checkpoint_errors_are_one_line_exit_2_and_overwrite_nothing(full, tmp_path, argv, fragment):
    out = tmp_path / "out"
    export_tiers(full[0], [1], out)
    before = (out / "tier1" / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated"
    save_checkpoint(build_model(TINY, device="cpu"), truncated)
    corrupt(truncated, "truncated")
    names = {"FULL": str(full[0]), "OUT": str(out), "NOWHERE": str(tmp_path / "nowhere"), "TRUNCATED": str(truncated)}
    result = matsim_here(*[names.get(a, a) for a in argv])
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr
    assert (out / "tier1" / "model.safetensors").read_bytes() == before
    assert not (out / "tier9").exists()


def test_memory_command_measures_each_tier_and_writes_table_data_and_chart(tmp_path):
    result = matsim_here("memory", "--config-path", "tiny", "--tiers", "0,1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "memory.json").read_text())
    assert [r["tier"] for r in records] == [0, 1] and all(r["peak_bytes"] > 0 for r in records)
    assert records[1]["analytic_bytes"] < records[0]["analytic_bytes"]
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "llama-7b" in result.stdout


def test_a_run_that_loads_a_checkpoint_prints_the_matformer_configuration_box(full, tmp_path):
    export_tiers(full[0], [1], tmp_path / "out")
    result = matsim_here("tiers", "--config-path", "tiny", "--tiers", "1,2", "--no-step",
                    "--checkpoint", str(tmp_path / "out" / "tier1"))
    assert result.returncode == 0, result.stderr
    box = result.stdout
    for line in ("MATFORMER CONFIGURATION", "auto -> sliced", "yes, stored tier 1", "CLI 1 -> effective 1",
                 f"{TINY.intermediate_size // 2} / {TINY.intermediate_size}"):
        assert line in box, line
