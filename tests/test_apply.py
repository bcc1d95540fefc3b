"""Applying an aggregate (sim/aggregate.apply_update)."""
import pytest
import torch

from sim.aggregate import ApplyRule, apply_update
from sim.errors import SimError


def fixed(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=gen, dtype=torch.float64)


def test_sign_rule_moves_every_element_by_lr_against_the_sign_after_weight_decay():
    param, update = fixed(0), fixed(1)
    update[0, 0] = 0.0
    expected = param * (1 - 0.1 * 0.01) - 0.1 * update.sign()
    params = {"w": param.clone()}
    apply_update(params, {"w": update}, lr=0.1, weight_decay=0.01)
    assert torch.equal(params["w"], expected)
    assert params["w"][0, 0] == param[0, 0] * (1 - 0.1 * 0.01)  # a zero aggregate moves nothing


def test_sgd_rule_is_plain_gradient_descent_on_the_aggregate():
    param, update = fixed(2), fixed(3)
    params = {"w": param.clone()}
    apply_update(params, {"w": update}, lr=0.5, rule=ApplyRule.SGD)
    assert torch.equal(params["w"], param - 0.5 * update)


def test_adamw_rule_matches_torch_adamw_over_several_rounds():
    reference = torch.nn.Parameter(fixed(4))
    optimizer = torch.optim.AdamW([reference], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    params, state = {"w": fixed(4)}, {}
    for round_ in range(5):
        update = fixed(10 + round_)
        reference.grad = update.clone()
        optimizer.step()
        apply_update(params, {"w": update}, lr=0.01, rule=ApplyRule.ADAMW, weight_decay=0.1, adam_state=state)
        torch.testing.assert_close(params["w"], reference.detach(), rtol=1e-12, atol=1e-12)


def test_adamw_without_state_is_a_clear_error():
    with pytest.raises(SimError, match=r"^ApplyRule.ADAMW needs an adam_state dict that persists across rounds$"):
        apply_update({"w": fixed(5)}, {"w": fixed(6)}, lr=0.1, rule=ApplyRule.ADAMW)


@pytest.mark.parametrize("rule", list(ApplyRule))
def test_several_replicas_at_once_move_exactly_as_each_one_alone(rule):
    """Catches a step computed for the first replica only, or applied once per replica too
    many; under AdamW, moments advanced once per replica (each alone keeps its own copy)."""
    updates = [{"w": fixed(7 + r), "b": fixed(8 + r)[0]} for r in range(3)]
    alone = [{"w": fixed(s), "b": fixed(s + 1)[0]} for s in (20, 30, 40)]
    together = [{name: t.clone() for name, t in replica.items()} for replica in alone]
    states = [{} for _ in alone]
    shared = {}
    for update in updates:
        for replica, state in zip(alone, states):
            apply_update(replica, update, lr=0.1, rule=rule, weight_decay=0.01, adam_state=state)
        apply_update(together, update, lr=0.1, rule=rule, weight_decay=0.01, adam_state=shared)
    assert all(torch.equal(a[name], b[name]) for a, b in zip(alone, together) for name in a)
    assert not torch.equal(alone[0]["w"], fixed(20))
