"""The receivers' modes a run chooses (state.toml's [matsim] table and Distro weight_decay,
the testnet's --matformer-mean-semantics, --apply-rule and --zero-blocks), each pinned on
a small concrete case: one round of tiny, lossless DisTrO (the whole delta goes out),
float64."""
import dataclasses
import json
import shutil

import pytest
import torch

from sim.aggregate import ApplyRule, MeanSemantics
from sim.analyze import modes_label
from sim.config import CONFIGS, DistroConfig, load_config
from sim.run import Network
from tests.cli import matsim_here

TINY = load_config("tiny")
CHUNK = TINY.distro.compression_chunk
LOSSLESS = TINY.replace(distro=DistroConfig(compression_chunk=CHUNK, compression_topk=CHUNK * CHUNK,
                                            quantize_1bit=False))
GATE = "model.layers.0.mlp.gate_proj.weight"


def one_round(config, tiers, rounds=1, seed=3):
    """(every parameter's change over `rounds` rounds, the last round's aggregate), as the
    first replica holds and computed them."""
    network = Network(config, tiers, seed=seed, device="cpu", dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in network._full_replica().named_parameters()}
    for round_ in range(rounds):
        network.round(round_, evaluate=False)
    after = dict(network._full_replica().named_parameters())
    update = network.aggregates[0].updates
    return {n: after[n].detach() - before[n] for n in before}, update


def test_peer_semantics_halves_the_suffix_only_one_of_two_peers_sends():
    """Tiers 0 and 1: the tier-1 peer covers the first half of the FFN neurons. Under COEFF_MEAN
    the suffix is the tier-0 peer's update alone; Psyche's PEER_MEAN divides it by both peers.
    On the shared prefix both are the mean of the two."""
    coeff = one_round(LOSSLESS.replace(mean_semantics="coeff"), [0, 1])[1][GATE]
    peer = one_round(LOSSLESS.replace(mean_semantics="peer"), [0, 1])[1][GATE]
    half = TINY.model.intermediate_size // 2
    torch.testing.assert_close(peer[half:], coeff[half:] / 2, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(peer[:half], coeff[:half], rtol=1e-9, atol=1e-15)
    assert coeff[half:].abs().max() > 1e-6


def test_region_semantics_counts_a_peer_whose_block_is_all_zero():
    """Two tier-0 peers on one sequence of 4 tokens each: where one peer's DCT block of the embedding is all
    zero (16 rows of tokens its batch lacks), COEFF_MEAN takes the other's update and
    REGION_MEAN halves it. Everywhere else the two agree."""
    name, small = "model.embed_tokens.weight", LOSSLESS.replace(seq_len=4, global_batch_size=2, global_batch_size_end=2)
    coeff = one_round(small.replace(mean_semantics="coeff"), [0, 0], seed=0)[1][name]
    region = one_round(small.replace(mean_semantics="region"), [0, 0], seed=0)[1][name]
    clear = coeff.abs() > 1e-12
    same = torch.isclose(region, coeff, rtol=1e-9, atol=1e-15)
    halved = torch.isclose(region, coeff / 2, rtol=1e-9, atol=1e-15) & clear
    assert bool((same | halved).all()) and bool(halved.any()) and bool((same & clear).any())


def zero_blocks(config, mode: str):
    return config.replace(distro=dataclasses.replace(config.distro, zero_blocks=mode))


def test_sent_zero_blocks_count_in_the_per_coefficient_mean_as_deme_and_psyche_count_them():
    """The REGION_MEAN case again under COEFF_MEAN: where one peer's embedding block is all
    zero, matsim's absent slot leaves the other peer's coefficients whole; sent as DeMo and
    Psyche (unquantized) send them, its zeros count and halve them: the aggregate equals
    REGION_MEAN's everywhere (lossless: the zeros go out at every index of the block)."""
    name, small = "model.embed_tokens.weight", LOSSLESS.replace(seq_len=4, global_batch_size=2, global_batch_size_end=2)
    absent = one_round(zero_blocks(small, "absent"), [0, 0], seed=0)[1][name]
    sent = one_round(zero_blocks(small, "sent"), [0, 0], seed=0)[1][name]
    region = one_round(small.replace(mean_semantics="region"), [0, 0], seed=0)[1][name]
    torch.testing.assert_close(sent, region, rtol=1e-9, atol=1e-15)
    assert not torch.allclose(sent, absent, rtol=1e-6)


def test_psyches_one_bit_signs_turn_a_block_without_gradient_into_plus_one_pushes():
    """Tiny with a chain over 16 of its 64 tokens: the input-embedding rows of tokens 16-63
    never get a gradient. Under 1-bit signs (k = 4 of 64 coefficients per block), the absent
    slot leaves them exactly where they started; sent as Psyche sends them, their top-k zeros
    arrive as +1 (the sign bit of +0.0 is clear), and every round moves those rows."""
    compressed = TINY.replace(markov=dataclasses.replace(TINY.markov, states=16),
                              distro=dataclasses.replace(TINY.distro, quantize_1bit=True))
    name, unseen = "model.embed_tokens.weight", slice(16, 64)
    absent, _ = one_round(zero_blocks(compressed, "absent"), [0, 0], rounds=3)
    sent, update = one_round(zero_blocks(compressed, "sent"), [0, 0], rounds=3)
    assert bool((absent[name][unseen] == 0).all())
    assert bool((update[name][unseen] != 0).any()) and bool((sent[name][unseen] != 0).any())


def test_each_apply_rule_steps_by_its_own_law():
    """One round from the same aggregate: sign moves each element by lr x sign(aggregate), SGD
    by lr x aggregate; AdamW's first step is sign-like (m / sqrt(v) = u / |u|), its second not."""
    lr = TINY.lr_schedule.lr(0)
    (sgd, update), (sign, _) = (one_round(LOSSLESS.replace(apply_rule=rule), [0, 1]) for rule in ("sgd", "sign"))
    for name in sign:
        torch.testing.assert_close(sign[name], -lr * update[name].sign(), rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(sgd[name], -lr * update[name], rtol=1e-6, atol=1e-15)
    adamw, _ = one_round(LOSSLESS.replace(apply_rule="adamw"), [0, 1])
    clear = {n: update[n].abs() > 1e-4 for n in sign}   # eps (1e-8) is no part of |u| there
    assert all(torch.allclose(adamw[n][clear[n]], sign[n][clear[n]], rtol=1e-3) for n in sign)
    (adamw_2, _), (sign_2, _) = (one_round(LOSSLESS.replace(apply_rule=rule), [0, 1], rounds=2)
                                 for rule in ("adamw", "sign"))
    assert not all(torch.allclose(adamw_2[n][clear[n]], sign_2[n][clear[n]], rtol=1e-3) for n in sign_2)


def test_distro_weight_decay_from_state_toml_shrinks_every_weight_by_lr_times_it(tmp_path):
    config = with_state(tmp_path, "[model.LLM.optimizer.Distro]", "weight_decay = 0.5\n")
    assert config.distro.weight_decay == 0.5 and config.modes["weight_decay"] == 0.5
    lr = config.lr_schedule.lr(0)
    network = Network(config.replace(distro=DistroConfig(**{**LOSSLESS.distro.__dict__, "weight_decay": 0.5})),
                      [0, 1], seed=3, device="cpu", dtype=torch.float64)
    assert network.weight_decay == 0.5
    plain = LOSSLESS.replace(apply_rule="sgd")
    decayed = plain.replace(distro=DistroConfig(**{**plain.distro.__dict__, "weight_decay": 0.5}))
    weights = Network(plain, [0, 1], seed=3, device="cpu", dtype=torch.float64)
    start = {n: p.detach().clone() for n, p in weights._full_replica().named_parameters()}
    (with_wd, _), (without, _) = one_round(decayed, [0, 1]), one_round(plain, [0, 1])
    for name in start:
        torch.testing.assert_close(with_wd[name] - without[name], -lr * 0.5 * start[name], rtol=1e-9, atol=1e-15)


def test_state_toml_names_the_modes_and_the_network_uses_them(tmp_path):
    config = with_state(tmp_path, "", '[matsim]\nmean_semantics = "peer"\napply_rule = "sgd"\n')
    network = Network(config, [0, 1], seed=0, device="cpu")
    assert network.semantics is MeanSemantics.PEER_MEAN and network.apply_rule is ApplyRule.SGD
    assert Network(TINY, [0], device="cpu").semantics is MeanSemantics.COEFF_MEAN


def test_testnet_flags_override_the_config_and_the_record_and_analysis_name_the_modes(tmp_path):
    result = matsim_here("testnet", "start", "--config-path", "tiny", "--client-matformer-tiers", "0,1", "--rounds", "2",
                         "--matformer-mean-semantics", "peer", "--apply-rule", "sgd", "--zero-blocks", "sent",
                         "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "scenario.json").read_text())
    assert meta["modes"] == {"mean_semantics": "peer", "apply_rule": "sgd", "weight_decay": 0.0, "zero_blocks": "sent"}
    analysis = matsim_here("analyze", str(tmp_path))
    assert "peer, sgd" in analysis.stdout
    row = json.loads((tmp_path / "analysis.json").read_text())["rows"][0]
    assert modes_label(row["modes"]) == "peer, sgd, zero blocks sent"


@pytest.mark.parametrize("where, text, fragment", [
    ("", '[matsim]\nmean_semantics = "median"\n', "[matsim] mean_semantics = 'median' is unknown: valid are coeff, peer, region"),
    ("", '[matsim]\napply_rule = "adam"\n', "[matsim] apply_rule = 'adam' is unknown: valid are sign, sgd, adamw"),
    ("", '[matsim]\nsemantics = "peer"\n', "[matsim] has unknown keys ['semantics']"),
    ("", '[matsim]\nzero_blocks = "zeros"\n', "[matsim] zero_blocks = 'zeros' is unknown: valid are absent, sent"),
    ("[model.LLM.optimizer.Distro]", 'zero_blocks = "sent"\n', "zero_blocks is matsim's key, not Psyche's"),
    ("[model.LLM.optimizer.Distro]", "weight_decay = -0.1\n", "weight_decay -0.1 is invalid: expected a finite number >= 0"),
])
def test_a_bad_mode_in_state_toml_is_one_line_naming_the_key_and_exit_2(tmp_path, where, text, fragment):
    with_state(tmp_path, where, text, load=False)
    result = matsim_here("testnet", "start", "--config-path", str(tmp_path / "cfg"), "--client-matformer-tiers", "0,1",
                         "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--matformer-mean-semantics", "median"], "--matformer-mean-semantics: invalid choice: 'median'"),
    (["--apply-rule", "adam"], "--apply-rule: invalid choice: 'adam'"),
    (["--zero-blocks", "zeros"], "--zero-blocks: invalid choice: 'zeros'"),
])
def test_a_bad_mode_flag_is_one_line_and_exit_2(tmp_path, argv, fragment):
    result = matsim_here("testnet", "start", "--config-path", "tiny", "--out", str(tmp_path / "out"), *argv)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr


def with_state(tmp_path, after: str, text: str, load: bool = True):
    """tiny's config with `text` added after the line `after` (or at the end)."""
    directory = tmp_path / "cfg"
    shutil.copytree(CONFIGS / "tiny", directory)
    state = (directory / "state.toml").read_text()
    state = state.replace(after + "\n", after + "\n" + text) if after else state + "\n" + text
    (directory / "state.toml").write_text(state)
    return load_config(directory) if load else None
