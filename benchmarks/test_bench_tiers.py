"""Forward+backward of nanogpt-20m-run at tier 0 (the baseline) and tier 1, one
512-token sequence on the default device. The ratio is what a tier-1 peer saves
in compute; GPT-2's 50257-token head is the same on every tier, which bounds it."""
import pytest
import torch

from sim.config import load_config
from sim.model import build_model, random_tokens

CFG = load_config("nanogpt-20m-run")


@pytest.fixture(scope="module")
def model_and_tokens():
    model = build_model(CFG.model, seed=0)
    return model, random_tokens(CFG.model, 1, CFG.seq_len, seed=1, device=next(model.parameters()).device)


def forward_backward(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, tokens.roll(-1, dims=1))[1]
    loss.backward()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return loss


@pytest.mark.parametrize("tier", [0, 1], ids=["tier0-baseline", "tier1"])
@pytest.mark.benchmark(group="nanogpt-20m-run forward+backward (1x512 tokens)")
def test_bench_forward_backward_per_tier(benchmark, model_and_tokens, tier):
    model, tokens = model_and_tokens
    model.set_tiers(tier)
    loss = benchmark.pedantic(forward_backward, args=(model, tokens), rounds=10, warmup_rounds=2)
    assert torch.isfinite(loss)
    width = CFG.model.intermediate_size >> tier
    assert torch.count_nonzero(model.model.layers[0].mlp.up_proj.weight.grad[width:]) == 0
