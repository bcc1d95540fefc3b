"""Checkpoints from runs: `testnet start` (both backends) saves the trained full model in
its results directory, every --checkpoint-every rounds and after the last round; a run
starts from one with --init-checkpoint; checkpoints past --max-shard-size are written, and
HF's sharded ones read, as model.safetensors.index.json plus shards. The README's
checkpoint commands run end to end from a testnet run. (The distributed backend's
checkpoint equals the in-process one: tests/test_distributed.py's parity test.)"""
import hashlib
import json

import pytest
import torch

from sim.checkpoint import INDEX, WEIGHTS, load_checkpoint, parse_size, read_checkpoint
from sim.config import load_config
from sim.errors import CheckpointError, ConfigError
from sim.run import Network, simulate
from tests.cli import matsim_here

TINY = load_config("tiny")


def test_the_readme_checkpoint_commands_run_end_to_end_from_a_testnet_run(tmp_path):
    run, exports = tmp_path / "run", tmp_path / "exports"
    assert matsim_here("testnet", "start", "--config-path", "tiny", "--client-matformer-tiers", "0,1", "--rounds", "3",
                       "--out", str(run)).returncode == 0
    checkpoint = run / "checkpoint"
    assert matsim_here("export-tiers", "--checkpoint", str(checkpoint), "--tiers", "1,2",
                       "--out", str(exports)).returncode == 0
    full = matsim_here("print-schema-hash", "--checkpoint", str(checkpoint), "--matformer-tier", "0")
    sliced = matsim_here("print-schema-hash", "--checkpoint", str(exports / f"{checkpoint.name}-tier1"),
                         "--matformer-tier", "1")
    assert full.returncode == sliced.returncode == 0 and full.stdout == sliced.stdout
    box = matsim_here("tiers", "--config-path", "tiny", "--checkpoint", str(exports / f"{checkpoint.name}-tier1"),
                      "--tiers", "1,2")
    assert box.returncode == 0 and "MATFORMER CONFIGURATION" in box.stdout
    restart = matsim_here("testnet", "start", "--config-path", "tiny", "--client-matformer-tiers", "0,1,2",
                          "--rounds", "1", "--init-checkpoint", str(checkpoint), "--out", str(tmp_path / "again"))
    assert restart.returncode == 0, restart.stderr
    assert json.loads((tmp_path / "again" / "scenario.json").read_text())["init_checkpoint"] == str(checkpoint)


def test_a_run_saves_its_final_weights_and_every_n_rounds(tmp_path):
    saved_after = []

    def on_round(record):   # called after the round's checkpoint, if any, is written
        path = tmp_path / "run" / "checkpoint" / WEIGHTS
        saved_after.append(hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None)

    result = simulate(TINY, [0, 1], rounds=5, seed=1, out=tmp_path / "run", checkpoint_every=2, device="cpu",
                      on_round=on_round)
    # Written after rounds 1 and 3 (every 2) and 4 (the last): never before round 1, and each
    # time with that round's weights (every round moves them).
    assert saved_after[0] is None and len({t for t in saved_after[1:]}) == 3
    assert saved_after[1] == saved_after[2] and saved_after[3] != saved_after[2]
    _, _, tensors = read_checkpoint(tmp_path / "run" / "checkpoint")
    for name, weight in result.final_weights.items():
        assert torch.equal(tensors[name], weight.cpu())


def test_every_client_starts_from_the_init_checkpoint_at_its_tier(tmp_path):
    source = Network(TINY, [0], seed=5, device="cpu")
    path = source.checkpoint(tmp_path / "ckpt")
    want = {n: p.detach().clone() for n, p in source.peers[0].model.named_parameters()}
    network = Network(TINY, [0, 1, 2], seed=9, device="cpu", init_checkpoint=path)
    for peer in network.peers:
        assert peer.model.layer_tiers == (peer.tiers[0],) * TINY.model.num_hidden_layers
        for name, param in peer.model.named_parameters():
            assert torch.equal(param.detach(), want[name])


def test_an_init_checkpoint_that_cannot_serve_the_clients_is_one_line_and_exit_2(tmp_path):
    run = tmp_path / "run"
    matsim_here("testnet", "start", "--config-path", "tiny", "--client-matformer-tiers", "0", "--rounds", "1",
                "--out", str(run))
    matsim_here("export-tiers", "--checkpoint", str(run / "checkpoint"), "--tiers", "1", "--out", str(tmp_path / "x"))
    for tiers, fragment in [("0,1", "tier 0 needs FFN width 64, but checkpoint"),
                            ("1,2", "is an export sliced to tier 1: a run needs one client holding the full weights")]:
        result = matsim_here("testnet", "start", "--config-path", "tiny", "--client-matformer-tiers", tiers,
                             "--init-checkpoint", str(tmp_path / "x" / "checkpoint-tier1"), "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()
    other = matsim_here("testnet", "start", "--config-path", "test-nanogpt-small", "--client-matformer-tiers", "0",
                        "--init-checkpoint", str(run / "checkpoint"), "--out", str(tmp_path / "out"))
    assert other.returncode == 2 and "is a different model than the config" in other.stderr
    with pytest.raises(ConfigError, match="sliced export"):
        Network(TINY, [1, 2], device="cpu", init_checkpoint=tmp_path / "x" / "checkpoint-tier1")


def test_checkpoints_past_the_shard_size_are_written_and_read_as_hf_writes_them(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = {k: v for k, v in TINY.model.to_hf_dict().items() if k not in ("architectures", "model_type")}
    reference = LlamaForCausalLM(LlamaConfig(**hf))
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB", safe_serialization=True)
    assert (tmp_path / "hf" / INDEX).is_file() and not (tmp_path / "hf" / WEIGHTS).exists()
    model, info = load_checkpoint(tmp_path / "hf", 1, "auto", device="cpu")
    assert not info.sliced and torch.equal(model.state_dict()["model.embed_tokens.weight"],
                                           reference.state_dict()["model.embed_tokens.weight"])
    exported = matsim_here("export-tiers", "--checkpoint", str(tmp_path / "hf"), "--tiers", "1",
                           "--out", str(tmp_path / "exports"), "--max-shard-size", "20KB")
    assert exported.returncode == 0, exported.stderr
    tier1 = tmp_path / "exports" / "hf-tier1"
    index = json.loads((tier1 / INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tier1 / s).stat().st_size <= 20_000 + 4096 for s in shards)
    _, _, tensors = read_checkpoint(tier1)
    for name, weight in reference.state_dict().items():
        if name in tensors and tensors[name].shape == weight.shape:
            assert torch.equal(tensors[name], weight)
    # A shard the index names but the directory lacks: a clear error, not a traceback.
    (tier1 / sorted(shards)[0]).unlink()
    with pytest.raises(CheckpointError, match="which is not a file"):
        read_checkpoint(tier1)


@pytest.mark.parametrize("text, size", [("200000", 200_000), ("200KB", 200_000), ("5GB", 5 * 10**9),
                                        ("5GiB", 5 * 2**30), ("3 mib", 3 * 2**20)])
def test_shard_sizes_read_as_hf_reads_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "-5", "5TB", "lots", ""])
def test_a_bad_shard_size_is_a_config_error(text):
    with pytest.raises(ConfigError, match="shard size"):
        parse_size(text)
