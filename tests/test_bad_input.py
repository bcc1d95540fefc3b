"""Bad input is a ConfigError naming the value and what is valid; from the CLI,
one line on stderr and exit 2."""
import json
import shutil

import pytest

from sim.cli import main
from sim.config import CONFIGS, load_config
from sim.errors import ConfigError
from sim.model import build_model
from sim.tiers import layer_tiers, tier_width
from tests.cli import matsim, matsim_here

TINY = load_config("tiny")


@pytest.mark.parametrize("call, fragment", [
    (lambda: tier_width(64, -1), "tier -1 is negative"),
    (lambda: tier_width(64, 7), "valid tiers are 0..6"),
    (lambda: tier_width(12, 3), "12 is not divisible by 2**3"),
    (lambda: layer_tiers([0, 1, 1], 2), "give one tier, or exactly 2"),
    (lambda: build_model(TINY.model, tiers=[0], device="cpu"), "got 1 per-layer tiers"),
    (lambda: TINY.model.__class__(**{**TINY.model.__dict__, "style": "gpt5"}), "valid styles are llama, nanogpt"),
    (lambda: load_config("no-such-config"), "bundled configs"),
])
def test_bad_input_raises_config_error_naming_the_value(call, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("*", r"\*").replace(".", r"\.")):
        call()


@pytest.mark.parametrize("argv, fragment", [
    (["--tiers=-1"], "tier -1 is negative"),
    (["--tiers=9"], "tier 9 is too deep"),
    (["--tiers=0,x"], "not a comma-separated list"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, fragment):
    result = matsim_here("tiers", "--config-path", "tiny", *argv)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_python_m_sim_answers_bad_input_with_one_line_and_exit_status_2():
    result = matsim("tiers", "--config-path", "tiny", "--tiers=9", timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "tier 9 is too deep" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_cli_unknown_model_style_in_config_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(CONFIGS / "tiny", bad)
    hf = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**hf, "model_type": "mamba"}))
    result = matsim_here("tiers", "--config-path", str(bad))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "'mamba' is unknown" in result.stderr and "llama, nanogpt" in result.stderr


def test_state_toml_contradicting_config_json_is_rejected(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(CONFIGS / "tiny", bad)
    state = (bad / "state.toml").read_text().replace('"HfLlama"', '"HfNanoGPT"')
    (bad / "state.toml").write_text(state)
    with pytest.raises(ConfigError, match="contradicts config.json model_type 'llama'"):
        load_config(bad)


def test_tiers_command_prints_one_row_per_tier_with_a_finite_loss(capsys):
    assert main(["tiers", "--config-path", "tiny", "--tiers", "0,1,2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "/64" in line]
    assert [row.split()[1] for row in rows] == ["0", "1", "2"]
    widths = [row.split()[3] for row in rows]
    assert widths == ["64/64", "32/64", "16/64"]
