"""Psyche's run-config surface: every schedule, optimizer, data_location and checkpoint
form, both state.toml layouts, the [config] keys that change a round, the overrides for
what this machine cannot reach, and Psyche's one-client tier flag.

The fixtures under tests/fixtures/psyche/ are matsim's own, written in Psyche's layout;
between them they use every form. Schedule values are Psyche's own test values
(shared/core/src/definitions.rs), worked by hand from its formulas."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sim.config import load_config
from sim.errors import ConfigError
from sim.run import simulate
from sim.schedule import ConstantSchedule, CosineSchedule, LinearSchedule, WarmupStableDecaySchedule
from tests.cli import matsim_here

REPO = Path(__file__).parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "psyche"
LLAMA = REPO / "configs" / "stand-ins" / "llama"
NANOGPT = REPO / "configs" / "stand-ins" / "nanogpt"


# --- schedules: Psyche's formulas at their boundaries -------------------------------

def test_constant_warms_up_linearly_then_holds_base_lr():
    s = ConstantSchedule(base_lr=0.01, warmup_steps=10, warmup_init_lr=0.001)
    assert [s.lr(t) for t in (0, 5, 9, 10, 1000)] == pytest.approx([0.001, 0.0055, 0.0091, 0.01, 0.01], abs=1e-15)
    assert ConstantSchedule(base_lr=0.01, warmup_steps=0, warmup_init_lr=0.001).lr(0) == 0.01


def test_linear_decays_from_warmup_end_to_final_lr_at_total_steps_and_holds_it_past_the_end():
    s = LinearSchedule(base_lr=0.01, warmup_steps=10, warmup_init_lr=0.001, total_steps=100, final_lr=0.0001)
    assert [s.lr(t) for t in (0, 5, 10, 55, 99, 100, 200)] == pytest.approx(
        [0.001, 0.0055, 0.01, 0.00505, 0.01 - 0.0099 * 89 / 90, 0.0001, 0.0001], abs=1e-15)


def test_cosine_reaches_final_lr_at_total_steps_and_climbs_back_past_it_as_psyche_computes_it():
    s = CosineSchedule(base_lr=0.01, warmup_steps=10, warmup_init_lr=0.001, total_steps=110, final_lr=0.0)
    assert [s.lr(t) for t in (0, 5, 10, 60, 110)] == pytest.approx([0.001, 0.0055, 0.01, 0.005, 0.0], abs=1e-15)
    # Psyche does not clamp the progress: at 1.5 of the way cos(1.5 pi) = 0, at 2 the rate is back at base_lr.
    assert [s.lr(t) for t in (160, 210)] == pytest.approx([0.005, 0.01], abs=1e-15)


def test_warmup_stable_decay_walks_its_four_phases_and_holds_the_last_rate():
    s = WarmupStableDecaySchedule(base_lr=0.01, warmup_steps=10, warmup_init_lr=0.001, stable_steps=60,
                                  cosine_decay_steps=110, cosine_decay_final_lr=0.001, linear_decay_steps=20,
                                  linear_decay_final_lr=0.0)
    assert [s.lr(t) for t in (0, 5, 10, 69, 70, 125, 180, 190, 200, 250)] == pytest.approx(
        [0.001, 0.0055, 0.01, 0.01, 0.01, 0.0055, 0.001, 0.0005, 0.0, 0.0], abs=1e-15)
    assert s.lr(179) == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 109 / 110)), abs=1e-15)
    zero = WarmupStableDecaySchedule(base_lr=0.01, warmup_steps=0, warmup_init_lr=0.001, cosine_decay_final_lr=0.001,
                                     linear_decay_final_lr=0.001)
    assert zero.lr(0) == 0.001


def test_the_cold_start_warmup_scales_the_first_steps_and_the_batch_ramps_by_tokens_consumed():
    config = load_config(FIXTURES / "dummy-wsd-weighted", data_location="dummy", model_config=NANOGPT)
    # cold_start_warmup_steps = 2: factor step / 2 for steps 0..2. The schedule: warmup 1 step (0), stable
    # 1 (0.01), cosine over 2 to 1e-3 (0.01, 0.001 + 0.009 / 2), linear over 2 to 0 (0.001, 0.0005), then 0.
    assert [config.lr(t) for t in range(7)] == pytest.approx([0.0, 0.005, 0.01, 0.0055, 0.001, 0.0005, 0.0])
    # start 2, end 8 over 512 tokens of 64: 0 tokens -> 2; 128 -> 2 + 6 * 0.25 = 3.5 -> 4 (half away from zero);
    # 384 -> 6.5 -> 7; 832 >= 512 -> 8.
    assert [config.global_batch(t) for t in range(5)] == [2, 4, 7, 8, 8]


# --- forms and layouts ------------------------------------------------------------

def test_each_fixture_reads_its_forms():
    read = {name: load_config(FIXTURES / name, data_location="dummy", model_config=model) for name, model in
            [("distro-linear-server", LLAMA), ("adamw-constant-http", LLAMA), ("dummy-wsd-weighted", NANOGPT),
             ("cosine-preprocessed-gcs", LLAMA), ("distro-local-p2p", None)]}
    distro = read["distro-linear-server"]
    assert (distro.optimizer, distro.distro.clip_grad_norm, distro.distro.weight_decay) == ("Distro", 1.0, 0.1)
    assert isinstance(distro.lr_schedule, LinearSchedule) and distro.data_location == "Server 127.0.0.1:20001"
    assert distro.checkpoint == "Hub example/remote-20m-init"
    adamw = read["adamw-constant-http"]   # the [model_extra_data] layout
    assert adamw.optimizer == "AdamW" and adamw.adamw.betas == (0.9, 0.95) and adamw.adamw.clip_grad_norm == 1.0
    assert isinstance(adamw.lr_schedule, ConstantSchedule) and adamw.data_location.startswith("Http SingleUrl")
    assert adamw.checkpoint == "P2P example/remote-20m-init"
    dummy = read["dummy-wsd-weighted"]
    assert dummy.optimizer == "Dummy" and isinstance(dummy.lr_schedule, WarmupStableDecaySchedule)
    assert (dummy.checkpoint, dummy.rounds_per_epoch, dummy.data_location) == (
        "Ephemeral", 5, "WeightedHttp https://example.invalid/weights.json")
    gcs = read["cosine-preprocessed-gcs"]
    assert gcs.checkpoint == "Gcs example-bucket" and gcs.data_location.startswith("Preprocessed")
    local = load_config(FIXTURES / "distro-local-p2p")   # Local data beside state.toml: read as it is
    assert local.data == str(FIXTURES / "distro-local-p2p" / "corpus.txt") and local.checkpoint == "Dummy"


@pytest.mark.parametrize("name", ["distro-linear-server", "adamw-constant-http", "dummy-wsd-weighted",
                                  "cosine-preprocessed-gcs"])
def test_remote_data_names_the_key_and_the_flag_and_the_override_is_recorded(tmp_path, name):
    model = NANOGPT if "dummy" in name else LLAMA
    config = load_config(FIXTURES / name, model_config=model)
    assert config.data is None
    argv = ["testnet", "start", "--config-path", str(FIXTURES / name), "--model-config", str(model),
            "--client-matformer-tiers", "0,1", "--rounds", "2", "--out", str(tmp_path / "run")]
    refused = matsim_here(*argv)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "model.LLM.data_location" in refused.stderr and "--data-location dummy|PATH" in refused.stderr
    assert not (tmp_path / "run").exists()
    ran = matsim_here(*argv, "--data-location", "dummy")
    assert ran.returncode == 0, ran.stderr
    meta = json.loads((tmp_path / "run" / "scenario.json").read_text())
    assert {"key": "data_location", "config": config.data_location, "used": "Dummy"} in meta["overrides"]
    assert meta["overrides"][-1]["key"] == "model_config" and meta["data"] == "Dummy"


def test_a_model_on_a_remote_hub_names_the_key_and_the_flag(tmp_path):
    result = matsim_here("testnet", "start", "--config-path", str(FIXTURES / "distro-linear-server"),
                         "--data-location", "dummy", "--client-matformer-tiers", "0,1", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "model.LLM.checkpoint (Hub example/remote-20m-init" in result.stderr and "--model-config PATH" in result.stderr


def test_a_local_byte_corpus_runs_without_overrides(tmp_path):
    result = matsim_here("testnet", "start", "--config-path", str(FIXTURES / "distro-local-p2p"),
                         "--client-matformer-tiers", "0,1", "--rounds", "2", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "scenario.json").read_text())
    assert meta["overrides"] == [] and meta["data_location"] == "Local corpus.txt"


# --- optimizers ---------------------------------------------------------------------

def test_under_adamw_each_client_steps_its_own_replica_and_nothing_is_sent():
    config = load_config(FIXTURES / "adamw-constant-http", data_location="dummy", model_config=LLAMA)
    result = simulate(config, [0, 0], rounds=3, seed=0, device="cpu")
    assert all(r["bytes_sent"] == 0 and r["contributing_peers"] == 0 for r in result.records)
    # Round 0 and 1 warm up from lr 0 (steps 0, 1 of 2): both replicas still agree after round 0;
    # after that each has stepped on its own shard.
    assert result.records[0]["replica_max_diff"] == 0.0 and result.records[-1]["replica_max_diff"] > 0


def test_adamw_steps_as_torch_adamw_with_psyches_clip_on_the_clients_own_gradient():
    config = load_config(FIXTURES / "adamw-constant-http", data_location="dummy", model_config=LLAMA)
    from sim.run import Network
    network = Network(config, [0], seed=3, device="cpu")
    model = network.peers[0].model
    twin = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(twin.values(), lr=config.lr(2), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tokens = network.tokens([network.peers[0]], 2)[0]
    loss = torch.func.functional_call(model, twin, (tokens[:, :-1], tokens[:, 1:]))[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(twin.values(), 1.0)
    optimizer.step()
    network.round(2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), twin[name].detach(), rtol=0, atol=0)
    network.close()


def test_under_dummy_no_weight_moves_and_the_record_still_carries_the_losses():
    config = load_config(FIXTURES / "dummy-wsd-weighted", data_location="dummy", model_config=NANOGPT)
    result = simulate(config, [0, 1], rounds=3, seed=0, device="cpu", eval_every=1)
    assert len({r["eval_loss"] for r in result.records}) == 1   # the same weights on the same held-out batch
    assert all(r["loss"] > 0 and r["bytes_sent"] == 0 for r in result.records)


def test_distro_clips_each_peers_gradient_before_compressing():
    config = load_config(FIXTURES / "distro-linear-server", data_location="dummy", model_config=LLAMA)
    clipped = simulate(config.replace(distro=config.distro.__class__(**{**config.distro.__dict__,
                                                                        "clip_grad_norm": 1e-6})),
                       [0, 1], rounds=3, seed=0, device="cpu").final_weights
    free = simulate(config.replace(distro=config.distro.__class__(**{**config.distro.__dict__,
                                                                     "clip_grad_norm": None})),
                    [0, 1], rounds=3, seed=0, device="cpu").final_weights
    # A clipped gradient is a scaled one, so round 0's signs agree; from round 1 on the momentum
    # holds the unscaled past, and the compressed updates differ.
    assert any(not torch.equal(clipped[n], free[n]) for n in free)


# --- flags ------------------------------------------------------------------------

def test_psyches_one_client_tier_flag_gives_every_client_that_tier(tmp_path):
    result = matsim_here("testnet", "start", "--config-path", "tiny", "--num-clients", "3", "--matformer-tier", "1",
                         "--rounds", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "scenario.json").read_text())
    assert meta["tiers"] == "1,1,1"
    both = matsim_here("testnet", "start", "--config-path", "tiny", "--matformer-tier", "1",
                       "--client-matformer-tiers", "0,1", "--out", str(tmp_path / "both"))
    assert both.returncode == 2 and "give one of them" in both.stderr and not (tmp_path / "both").exists()


DISTRO = """[model.LLM.optimizer.Distro]
compression_decay = 0.999
compression_chunk = 16
compression_topk = 4
quantize_1bit = true"""
COSINE = """[model.LLM.lr_schedule.Cosine]
base_lr = 4.0e-3
warmup_steps = 0"""


@pytest.mark.parametrize("old, new, fragment", [
    (DISTRO, "[model.LLM.optimizer.Adam]\nlr = 1.0", "model.LLM.optimizer {'Adam': {'lr': 1.0}} is unknown: valid are "
                                                     "Distro, AdamW, Dummy"),
    (DISTRO, '[model_extra_data]\noptimizer = "Adam"', "model.LLM.optimizer 'Adam' is unknown"),
    (COSINE, "[model.LLM.lr_schedule.Exponential]\nbase_lr = 1.0\n[x]", "model.LLM.lr_schedule {'Exponential'"),
    (DISTRO, "[model.LLM.optimizer.AdamW]\nbetas = [0.9]\nweight_decay = 0.0\neps = 1e-8",
     "optimizer.AdamW betas [0.9] is invalid: expected a list of two numbers"),
    (DISTRO, "[model.LLM.optimizer.AdamW]\nbetas = [0.9, 0.95]\nweight_decay = -0.1\neps = 1e-8",
     "optimizer.AdamW weight_decay -0.1 is invalid"),
    ("quantize_1bit = true", "quantize_1bit = true\nweight_decay = -1.0", "optimizer.Distro weight_decay -1.0 is invalid"),
    ("warmup_steps = 0", "warmup_steps = 10", "lr_schedule.Cosine total_steps 10 is invalid: expected more than "
                                              "warmup_steps 10"),
    (COSINE, "[model.LLM.lr_schedule.WarmupStableDecay]\nbase_lr = 1e-3\ncosine_decay_final_lr = 1e-2\n[x]",
     "lr_schedule.WarmupStableDecay needs linear_decay_final_lr <= cosine_decay_final_lr <= base_lr"),
    ('{ Local = "corpus.txt" }', '{ Ftp = "x" }', "model.LLM.data_location {'Ftp': 'x'} is unknown"),
    ("[model.LLM.checkpoint.Dummy]", "[model.LLM.checkpoint.Hub]", "model.LLM.checkpoint.Hub repo_id is empty"),
    ("global_batch_size_end = 4", "global_batch_size_end = 2", "global_batch_size_end 2 is below global_batch_size_start 4"),
])
def test_a_bad_value_is_one_line_naming_the_key_and_exit_2(tmp_path, old, new, fragment):
    config = tmp_path / "cfg"
    shutil.copytree(FIXTURES / "distro-local-p2p", config)
    state = (config / "state.toml").read_text()
    assert old in state
    (config / "state.toml").write_text(state.replace(old, new))
    result = matsim_here("testnet", "start", "--config-path", str(config), "--client-matformer-tiers", "0,1",
                         "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        load_config(config)


def test_a_hub_checkpoint_on_a_local_path_supplies_the_models_config_json(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "init"
    checkpoint.mkdir(parents=True)
    shutil.copy(LLAMA / "config.json", checkpoint / "config.json")
    config = tmp_path / "cfg"
    config.mkdir()
    state = (FIXTURES / "distro-linear-server" / "state.toml").read_text()
    (config / "state.toml").write_text(state.replace('repo_id = "example/remote-20m-init"', f'repo_id = "{checkpoint}"'))
    loaded = load_config(config, data_location="dummy")
    assert loaded.checkpoint == f"Hub {checkpoint}" and loaded.model.hidden_size == 64
    assert [key for key, _, _ in loaded.overrides] == ["data_location"]
