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
    b = matsim_here("print-schema-hash", "--checkpoint", str(tmp_path / "out" / f"{full[0].name}-tier1"),
                    "--matformer-tier", "1")
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
    before = (out / f"{full[0].name}-tier1" / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated"
    save_checkpoint(build_model(TINY, device="cpu"), truncated)
    corrupt(truncated, "truncated")
    names = {"FULL": str(full[0]), "OUT": str(out), "NOWHERE": str(tmp_path / "nowhere"), "TRUNCATED": str(truncated)}
    result = matsim_here(*[names.get(a, a) for a in argv])
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr
    assert (out / f"{full[0].name}-tier1" / "model.safetensors").read_bytes() == before
    assert not (out / f"{full[0].name}-tier9").exists()


def test_memory_command_measures_each_tier_and_writes_table_data_and_chart(tmp_path):
    result = matsim_here("memory", "--config-path", "tiny", "--tiers", "0,1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "memory.json").read_text())
    records = written["measured"]
    assert [r["tier"] for r in records] == [0, 1] and all(r["peak_bytes"] > 0 for r in records)
    assert written["commit"] and {"tiny", "llama-7b"} <= {r["model"] for r in written["analytic"]}
    assert records[1]["analytic_bytes"] < records[0]["analytic_bytes"]
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "llama-7b" in result.stdout


def test_a_run_that_loads_a_checkpoint_prints_the_matformer_configuration_box(full, tmp_path):
    export_tiers(full[0], [1], tmp_path / "out")
    result = matsim_here("tiers", "--config-path", "tiny", "--tiers", "1,2", "--no-step",
                    "--checkpoint", str(tmp_path / "out" / f"{full[0].name}-tier1"))
    assert result.returncode == 0, result.stderr
    box = result.stdout
    for line in ("MATFORMER CONFIGURATION", "auto -> sliced", "yes, stored tier 1", "CLI 1 -> effective 1",
                 f"{TINY.intermediate_size // 2} / {TINY.intermediate_size}"):
        assert line in box, line


# --- tier checkpoints where Psyche's client looks -------------------------------------

def test_tier_checkpoints_resolve_by_psyches_three_rules(tmp_path):
    """Psyche's resolve_matformer_local_repo_path: tier t of `base` is `<base>-tier<t>`. auto takes
    it where it exists, else `base` (sliced at load); sliced requires it where `base` exists
    (MissingMatformerTierCheckpoint, Psyche's words); universal and tier 0 always take `base`."""
    from sim.checkpoint import resolve_tier_checkpoint
    from sim.errors import MissingTierCheckpoint
    base = save_checkpoint(build_model(TINY, device="cpu"), tmp_path / "init")
    (tier1,) = export_tiers(base, [1])
    assert tier1 == tmp_path / "init-tier1"
    assert resolve_tier_checkpoint(base, 1, "auto") == (tier1, True)
    assert resolve_tier_checkpoint(base, 2, "auto") == (base, False)
    assert resolve_tier_checkpoint(base, 1, "sliced") == (tier1, True)
    assert resolve_tier_checkpoint(base, 1, "universal") == (base, False)
    assert resolve_tier_checkpoint(base, 0, "sliced") == (base, False)
    with pytest.raises(MissingTierCheckpoint, match=f"Required MatFormer tier checkpoint for tier 2 not found at "
                                                    f"{tmp_path / 'init-tier2'}"):
        resolve_tier_checkpoint(base, 2, "sliced")
    assert resolve_tier_checkpoint(tmp_path / "gone", 1, "sliced") == (None, False)
    model, info = load_checkpoint(base, 1, "auto", device="cpu")   # a Psyche-layout export loads by its rules
    assert info.checkpoint == str(tier1) and info.sliced and model.stored_widths == (TINY.intermediate_size // 2,) * 2
    refused = matsim_here("print-schema-hash", "--checkpoint", str(base), "--matformer-tier", "2",
                          "--matformer-load-strategy", "sliced")
    assert refused.returncode == 2 and "Required MatFormer tier checkpoint for tier 2" in refused.stderr


def test_an_export_keeps_every_config_key_and_the_auxiliary_files_and_refuses_a_sliced_source(tmp_path):
    base = save_checkpoint(build_model(TINY, device="cpu"), tmp_path / "init")
    config = json.loads((base / "config.json").read_text())
    extra = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "initializer_range": 0.02,
             "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "torch_dtype": "float32"}
    (base / "config.json").write_text(json.dumps({**config, **extra}))
    aux = {"tokenizer.json": "{}", "tokenizer_config.json": "{\"x\": 1}", "special_tokens_map.json": "{}",
           "generation_config.json": "{\"eos_token_id\": 2}", "modeling_custom.py": "# code\n"}
    for name, text in aux.items():
        (base / name).write_text(text)
    (tier1,) = export_tiers(base, [1])
    written = json.loads((tier1 / "config.json").read_text())
    assert {k: v for k, v in written.items() if k in extra} == extra
    assert (written["intermediate_size"], written["matformer_tier"], written["matformer_base_intermediate_size"]) == (
        TINY.intermediate_size // 2, 1, TINY.intermediate_size)
    assert all((tier1 / name).read_text() == text for name, text in aux.items())
    refused = matsim_here("export-tiers", "--checkpoint", str(tier1), "--tiers", "2")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "already sliced to tier 1" in refused.stderr
    assert not (tmp_path / "init-tier1-tier2").exists()


@pytest.mark.parametrize("source", ["transformers", "matsim"])
def test_an_export_equals_psyches_export_script_tensor_for_tensor_and_key_for_key(tmp_path, source):
    """Psyche's scripts/export_matformer_tiers.py run as it is, beside matsim's export-tiers, on a
    checkpoint saved by transformers and on one saved by matsim: the same directories, config.json
    keys and values, tensors (names, dtypes, values) and auxiliary files."""
    import subprocess
    import sys

    import safetensors.torch

    from tests.psyche import source as psyche_file
    script = psyche_file("scripts/export_matformer_tiers.py")
    for side in ("psyche", "matsim"):
        base = tmp_path / side / "init"
        if source == "transformers":
            from transformers import LlamaConfig, LlamaForCausalLM
            hf = {k: v for k, v in TINY.to_hf_dict().items() if k not in ("architectures", "model_type")}
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**hf)).save_pretrained(base)
        else:
            save_checkpoint(build_model(TINY, seed=0, device="cpu"), base)
        (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    subprocess.run([sys.executable, str(script), "--src", str(tmp_path / "psyche" / "init"), "--tiers", "1", "2"],
                   check=True, capture_output=True, timeout=300)
    assert matsim_here("export-tiers", "--checkpoint", str(tmp_path / "matsim" / "init"), "--tiers", "1,2").returncode == 0
    for tier in (1, 2):
        theirs, ours = tmp_path / "psyche" / f"init-tier{tier}", tmp_path / "matsim" / f"init-tier{tier}"
        assert json.loads((theirs / "config.json").read_text()) == json.loads((ours / "config.json").read_text())
        assert (theirs / "tokenizer_config.json").read_text() == (ours / "tokenizer_config.json").read_text()
        a, b = (safetensors.torch.load_file(d / "model.safetensors") for d in (theirs, ours))
        assert a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)
