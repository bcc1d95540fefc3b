"""A planted bug reaches every path a run takes.

Each bug of the catalog that changes what a run computes or records (`RUN_BUGS`) is planted
in turn, and a short run is played twice: the default (batching "auto", which batches the
groups of one shape on tiny) and batching "off" (every peer alone). The bug must change
both runs (their records or their final weights), or, for the bugs that by design live in
the batched gradients alone (`BATCHED`), the batched run and not the other. A bug that
changes one path only was planted where only that path goes: a check built on it would
pass on the path users run.

Two scenarios between them give every bug a stage to act on: A (unquantized top-k, SGD
apply, clipping, weight decay, batch ramp, cold start, helpers, late/drop/churn faults) and
B (Psyche's 1-bit with sent zero blocks, sign apply).
"""
import dataclasses
import functools
import json

import pytest
import torch

from sim.aggregate import ApplyRule
from sim.config import load_config
from sim.engine import groups
from sim.run import Network, simulate
from tests.planted_bugs import BATCHED, RUN_BUGS, plant, references

TINY = load_config("tiny")
SCENARIOS = {
    "A": dict(config=TINY.replace(distro=dataclasses.replace(TINY.distro, quantize_1bit=False, clip_grad_norm=0.5,
                                                             weight_decay=0.1),
                                  global_batch_size=4, global_batch_size_end=8, global_batch_size_warmup_tokens=160,
                                  cold_start_warmup_steps=2),
              tiers=[0, 0, 1, 1, 2], fractions=[0, 0, 0.5, 0.5, 0], faults="late=0.15,drop=0.1,churn=0.15",
              apply_rule=ApplyRule.SGD),
    "B": dict(config=TINY.replace(distro=dataclasses.replace(TINY.distro, quantize_1bit=True, zero_blocks="sent")),
              tiers=[0, 0, 1, 1], fractions=[0, 0, 0, 0], faults="", apply_rule=ApplyRule.SIGN),
}
SEED, ROUNDS = 0, 6


def play(scenario: str, batching: str) -> tuple[str, dict[str, torch.Tensor]]:
    s = SCENARIOS[scenario]
    result = simulate(s["config"], s["tiers"], s["fractions"], faults=s["faults"], seed=SEED, rounds=ROUNDS,
                      device="cpu", batching=batching, eval_every=1, apply_rule=s["apply_rule"])
    return json.dumps(result.records, sort_keys=True), result.final_weights


@functools.cache
def honest(scenario: str, batching: str):
    return play(scenario, batching)


def changes(scenario: str, batching: str, honest_run) -> bool:
    (records, weights), (want, honest_weights) = play(scenario, batching), honest_run
    return records != want or any(not torch.equal(weights[n], honest_weights[n]) for n in weights)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_default_run_of_each_scenario_batches_groups_of_one_shape(scenario):
    """Else the auto run would take the serial path, and the test below would prove nothing."""
    s = SCENARIOS[scenario]
    network = Network(s["config"], s["tiers"], s["fractions"], SEED, device="cpu")
    trainers = [p for p in network.present() if p.id in network.assignment(0)]
    assert any(batched for _, batched in groups(network, trainers, 0, "auto"))


@pytest.mark.parametrize("bug", RUN_BUGS)
def test_a_planted_bug_changes_the_default_run_and_the_serial_run(bug, monkeypatch):
    runs = {(s, batching): honest(s, batching) for s in SCENARIOS for batching in ("auto", "off")}   # before planting
    with monkeypatch.context() as patched:
        plant(patched, bug)
        live = {batching: any(changes(s, batching, runs[s, batching]) for s in SCENARIOS) for batching in ("auto", "off")}
    assert live == {"auto": True, "off": bug not in BATCHED}, live


@pytest.mark.parametrize("bug", RUN_BUGS)
def test_no_module_keeps_the_original_of_a_planted_function(bug, monkeypatch):
    """However a caller imported it, it calls the bug: no loaded module's global still holds
    the function a bug replaced."""
    from tests.planted_bugs import BUGS
    originals = [getattr(target, attribute) for target, attribute, _ in BUGS[bug][1] if not isinstance(target, dict)]
    with monkeypatch.context() as patched:
        plant(patched, bug)
        for original in originals:
            assert not references(original), (bug, [(m.__name__, a) for m, a in references(original)])
