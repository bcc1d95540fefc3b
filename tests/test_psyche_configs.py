"""Psyche's run-config surface: every schedule, optimizer, data_location and checkpoint
form, both layouts Psyche reads (a local testnet's state.toml, a Solana run's config), what
Psyche at HEAD refuses and ignores, the [config] keys that change a round, the overrides for
what this machine cannot reach, and Psyche's one-client tier flag.

The fixtures under tests/fixtures/psyche/ are matsim's own, written in Psyche's layout;
between them they use every form. Schedule values are Psyche's own test values
(shared/core/src/definitions.rs), worked by hand from its formulas."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from sim.config import CONFIGS, load_config
from sim.errors import ConfigError
from sim.run import simulate
from sim.schedule import ConstantSchedule, CosineSchedule, LinearSchedule, WarmupStableDecaySchedule
from tests.cli import matsim_here

REPO = Path(__file__).parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "psyche"
LLAMA = CONFIGS / "stand-ins" / "llama"
NANOGPT = CONFIGS / "stand-ins" / "nanogpt"


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
             ("cosine-preprocessed-hub", LLAMA), ("distro-local-p2p", None)]}
    distro = read["distro-linear-server"]
    assert (distro.optimizer, distro.distro.clip_grad_norm, distro.distro.weight_decay) == ("Distro", 1.0, 0.1)
    assert isinstance(distro.lr_schedule, LinearSchedule) and distro.data_location == "Server 127.0.0.1:20001"
    assert distro.checkpoint == "Hub example/remote-20m-init"
    adamw = read["adamw-constant-http"]
    assert adamw.optimizer == "AdamW" and adamw.adamw.betas == (0.9, 0.95) and adamw.adamw.clip_grad_norm == 1.0
    assert isinstance(adamw.lr_schedule, ConstantSchedule) and adamw.data_location.startswith("Http SingleUrl")
    assert adamw.checkpoint == "P2P example/remote-20m-init"
    dummy = read["dummy-wsd-weighted"]
    assert dummy.optimizer == "Dummy" and isinstance(dummy.lr_schedule, WarmupStableDecaySchedule)
    assert (dummy.checkpoint, dummy.data_location) == ("Ephemeral", "WeightedHttp https://example.invalid/weights.json")
    assert dummy.ignored == ("config.rounds_per_epoch",)   # epochs are timed at HEAD: Psyche skips the key
    hub = read["cosine-preprocessed-hub"]
    assert hub.checkpoint == "Hub example/remote-init" and hub.data_location.startswith("Preprocessed")
    local = load_config(FIXTURES / "distro-local-p2p")   # Local data beside state.toml: read as it is
    assert local.data == str(FIXTURES / "distro-local-p2p" / "corpus.txt") and local.checkpoint == "Dummy"
    assert all(not config.refused for config in read.values())


@pytest.mark.parametrize("name, reasons, ignored", [
    ("stale-no-epoch-time", ["serde: config: missing field `epoch_time`",
                             "past that, CoordinatorConfig::check: cooldown_time > 0 fails (cooldown_time = 0)"],
     ["config.rounds_per_epoch"]),
    ("stale-model-extra-data", ["serde: model.LLM: missing field `architecture`"],
     ["model.LLM.checkpoint_source", "model_extra_data"]),
])
def test_a_config_psyche_refuses_is_refused_with_its_reason_unless_the_run_accepts_it(tmp_path, name, reasons, ignored):
    """Psyche at HEAD's serde and checks decide: the file is refused in one line with every reason
    and the flag; --accept-stale-config runs it and scenario.json records why it was refused and
    which keys Psyche skips. A [model_extra_data] table is one of those: Psyche reads nothing there."""
    argv = ["testnet", "start", "--config-path", str(FIXTURES / name), "--model-config", str(LLAMA),
            "--data-location", "dummy", "--client-matformer-tiers", "0,1", "--rounds", "1", "--out", str(tmp_path / "run")]
    refused = matsim_here(*argv)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert all(reason in refused.stderr for reason in reasons) and "--accept-stale-config" in refused.stderr
    assert not (tmp_path / "run").exists()
    ran = matsim_here(*argv, "--accept-stale-config")
    assert ran.returncode == 0, ran.stderr
    meta = json.loads((tmp_path / "run" / "scenario.json").read_text())
    assert meta["psyche_refuses"] == reasons and meta["psyche_ignores"] == ignored


def test_a_solana_run_config_is_read_as_psyche_reads_one(tmp_path):
    """A Solana run's config: [config] and [model] with no run_id, as a .toml file of its own."""
    state = (FIXTURES / "distro-local-p2p" / "state.toml").read_text()
    solana = "\n".join(line for line in state.splitlines() if not line.startswith(("run_id", "run_state")))
    (tmp_path / "run.toml").write_text(solana.replace('"corpus.txt"', f'"{FIXTURES / "distro-local-p2p" / "corpus.txt"}"'))
    shutil.copy(FIXTURES / "distro-local-p2p" / "config.json", tmp_path / "config.json")
    config = load_config(tmp_path / "run.toml")
    assert config.name == "run" and not config.refused and config.optimizer == "Distro"


@pytest.mark.parametrize("name", ["distro-linear-server", "adamw-constant-http", "dummy-wsd-weighted",
                                  "cosine-preprocessed-hub"])
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
    # What Psyche's serde refuses, in its words.
    (DISTRO, "[model.LLM.optimizer.Adam]\nlr = 1.0", "Psyche at HEAD refuses it: serde: model.LLM.optimizer: unknown "
                                                     "variant `Adam`, expected one of `Dummy`, `AdamW`, `Distro`"),
    (DISTRO, '[model_extra_data]\noptimizer = "AdamW"', "serde: model.LLM: missing field `optimizer`"),
    (COSINE, "[model.LLM.lr_schedule.Exponential]\nbase_lr = 1.0\n[x]", "unknown variant `Exponential`"),
    (DISTRO, "[model.LLM.optimizer.AdamW]\nbetas = [0.9]\nweight_decay = 0.0\neps = 1e-8",
     "serde: model.LLM.optimizer.AdamW.betas: invalid length"),
    (COSINE, "[model.LLM.lr_schedule.WarmupStableDecay]\nbase_lr = 1e-3\ncosine_decay_final_lr = 1e-2\n[x]",
     "serde: model.LLM.lr_schedule.WarmupStableDecay: missing field `warmup_init_lr`"),
    ('{ Local = "corpus.txt" }', '{ Ftp = "x" }', "unknown variant `Ftp`"),
    ("compression_chunk = 16", "compression_chunk = -16", "invalid value: integer `-16`, expected u16"),
    # What its CoordinatorConfig::check refuses, the condition named.
    ("global_batch_size_end = 4", "global_batch_size_end = 2",
     "CoordinatorConfig::check: global_batch_size_end >= global_batch_size_start fails"),
    ("cooldown_time = 5", "cooldown_time = 0", "CoordinatorConfig::check: cooldown_time > 0 fails (cooldown_time = 0)"),
    # What Psyche accepts and cannot run, matsim refuses in its own words.
    (DISTRO, "[model.LLM.optimizer.AdamW]\nbetas = [0.9, 0.95]\nweight_decay = -0.1\neps = 1e-8",
     "optimizer.AdamW weight_decay -0.1 is invalid"),
    ("quantize_1bit = true", "quantize_1bit = true\nweight_decay = -1.0", "optimizer.Distro weight_decay -1.0 is invalid"),
    ("warmup_steps = 0", "warmup_steps = 10", "lr_schedule.Cosine total_steps 10 is invalid: expected more than "
                                              "warmup_steps 10"),
    ("[model.LLM.checkpoint.Dummy]", "[model.LLM.checkpoint.Hub]", "model.LLM.checkpoint.Hub repo_id is empty"),
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


# --- micro-batches --------------------------------------------------------------------

def test_an_evaluation_too_big_for_this_machine_is_refused_though_every_step_fits(monkeypatch):
    """The held-out batch is a whole global batch, evaluated by one model: with 4 trainers each
    step holds a quarter of it. A budget between the two refuses the run, naming the
    evaluation and the micro-batch size that makes both fit."""
    import sim.memory
    config = load_config("tiny").replace(global_batch_size=16, global_batch_size_end=16)
    step, evaluation = sim.memory.step_bytes(config, 0, 4), sim.memory.eval_bytes(config)
    assert step < evaluation
    monkeypatch.setattr(sim.memory, "memory_budget", lambda: (step + evaluation) // 2)
    with pytest.raises(ConfigError, match=r"the held-out evaluation needs .*\(16 x 16 tokens at once of its 16 "
                                          r"sequences.*give --micro-batch-size (\d+)") as refused:
        sim.memory.check_fits(config, 4)
    micro = int(re.search(r"--micro-batch-size (\d+)", str(refused.value)).group(1))
    sim.memory.check_fits(config.replace(micro_batch_size=micro), 4)
    with pytest.raises(ConfigError):
        sim.memory.check_fits(config.replace(micro_batch_size=micro + 1), 4)


def test_a_step_too_big_for_this_machine_names_the_micro_batch_that_fits(tmp_path, monkeypatch):
    """The budget is the machine's (half its memory): here set just below one trainer's whole
    batch, so the refusal names --micro-batch-size and the largest that fits, and that one runs."""
    import sim.memory
    config = load_config("tiny").replace(global_batch_size=8, global_batch_size_end=8)
    need = {m: sim.memory.step_bytes(config.replace(micro_batch_size=m), 0, 4) for m in (1, 2, 3, 4)}
    monkeypatch.setattr(sim.memory, "memory_budget", lambda: need[2] + 1)   # 2 of 4 sequences at once fit, 4 do not
    config_dir = tmp_path / "cfg"
    shutil.copytree(CONFIGS / "tiny", config_dir)
    state = (config_dir / "state.toml").read_text()
    (config_dir / "state.toml").write_text(state.replace("global_batch_size_start = 4", "global_batch_size_start = 8")
                                           .replace("global_batch_size_end = 4", "global_batch_size_end = 8"))
    argv = ["testnet", "start", "--config-path", str(config_dir), "--client-matformer-tiers", "0,1", "--rounds", "1",
            "--out", str(tmp_path / "run")]
    refused = matsim_here(*argv)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    # 3 splits 4 sequences as Psyche does, into ceil(4 / 3) = 2 pieces of 2: the largest flag that fits.
    assert "give --micro-batch-size 3 (the largest that fits: a step's pieces of at most 2 sequences" in refused.stderr
    assert not (tmp_path / "run").exists()
    ran = matsim_here(*argv, "--micro-batch-size", "3")
    assert ran.returncode == 0, ran.stderr
    assert json.loads((tmp_path / "run" / "scenario.json").read_text())["micro_batch_size"] == 3


def test_the_configs_script_accounts_for_every_toml_of_a_config_folder(tmp_path):
    """scripts/psyche_configs.py on a folder laid out as Psyche's config/: a state.toml Psyche
    accepts (run), one it refuses (not run, with its reason; run with --accept-stale-config), a
    Solana run config (read and run), and a data server's data.toml (named, not a run config)."""
    from scripts import psyche_configs as script
    folder = tmp_path / "checkout" / "config"
    shutil.copytree(FIXTURES / "distro-local-p2p", folder / "fresh")
    shutil.copytree(FIXTURES / "stale-no-epoch-time", folder / "stale")
    state = (FIXTURES / "distro-local-p2p" / "state.toml").read_text()
    (folder / "solana").mkdir()
    (folder / "solana" / "run.toml").write_text("\n".join(
        line for line in state.splitlines() if not line.startswith(("run_id", "run_state"))).replace(
        '"corpus.txt"', f'"{FIXTURES / "distro-local-p2p" / "corpus.txt"}"'))
    shutil.copy(FIXTURES / "distro-local-p2p" / "config.json", folder / "solana" / "config.json")
    (folder / "fresh" / "data.toml").write_text('dir = "data"\n')
    for accept, out in ((False, tmp_path / "strict"), (True, tmp_path / "lenient")):
        argv = [str(tmp_path / "checkout"), "--rounds", "1", "--out", str(out)] + (["--accept-stale-config"] if accept else [])
        assert script.main(argv) == 0
        table = json.loads((out / "table.json").read_text())
        rows = {row["file"]: row for row in table["files"]}
        assert set(rows) == {"fresh/state.toml", "fresh/data.toml", "stale/state.toml", "solana/run.toml"}
        assert table["commit"] and "dirty" in table
        assert rows["fresh/state.toml"]["ran"] and rows["solana/run.toml"]["ran"]
        assert rows["solana/run.toml"]["kind"] == "Solana run config" and rows["fresh/data.toml"]["kind"] == "data server config"
        assert rows["stale/state.toml"]["psyche"].startswith("refuses: serde: config: missing field `epoch_time`")
        assert rows["stale/state.toml"]["ran"] == accept and not rows["fresh/data.toml"]["ran"]
