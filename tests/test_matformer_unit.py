"""The verification chapter's four unit tests, on its shapes (nanogpt-20m-run:
hidden 256, FFN 1024, so a tier-1 gate gradient is [512, 256])."""
import dataclasses

import pytest
import torch

from sim.align import align_prefix_grad, prefix_dim
from sim.config import load_config
from sim.errors import UnsupportedParameter
from sim.model import build_model, random_tokens

CHAPTER = load_config("nanogpt-20m-run").model


@pytest.mark.parametrize("style", ["nanogpt", "llama"])
def test_matformer_mlp_has_zero_tail_grads(style):
    cfg = dataclasses.replace(CHAPTER, style=style)
    model = build_model(cfg, tiers=1, seed=0, device="cpu")
    tokens = random_tokens(cfg, 2, 32, seed=1, device="cpu")
    model(tokens, tokens.roll(-1, dims=1))[1].backward()
    width = cfg.intermediate_size >> 1
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        rows = [mlp.up_proj] + ([mlp.gate_proj] if style == "llama" else [])
        for proj in rows:
            assert torch.count_nonzero(proj.weight.grad[width:]) == 0, f"layer {i}: suffix rows got gradient"
            assert torch.count_nonzero(proj.weight.grad[:width]) > 0, f"layer {i}: prefix rows got none"
        assert torch.count_nonzero(mlp.down_proj.weight.grad[:, width:]) == 0, f"layer {i}: suffix columns got gradient"
        assert torch.count_nonzero(mlp.down_proj.weight.grad[:, :width]) > 0


def test_align_matformer_prefix_grad_expand_gate():
    grad = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    full = align_prefix_grad("model.layers.0.mlp.gate_proj.weight", grad, (1024, 256))
    assert full.shape == (1024, 256)
    assert torch.equal(full[:512], grad)
    assert torch.count_nonzero(full[512:]) == 0


def test_align_matformer_prefix_grad_slice_down():
    grad = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.mlp.down_proj.weight"
    assert prefix_dim(name) == 1
    local = align_prefix_grad(name, grad, (256, 512))
    assert local.shape == (256, 512)
    assert torch.equal(local, grad[:, :512])


@pytest.mark.parametrize("style", ["nanogpt", "llama"])
def test_align_matformer_prefix_grad_rejects_non_mlp(style):
    state = build_model(dataclasses.replace(CHAPTER, style=style), device="cpu").state_dict()
    accepted = {n for n in state if n.split(".")[-2] in ("gate_proj", "up_proj", "down_proj")}
    rejected = set(state) - accepted
    assert {n.split(".")[-2] for n in rejected} >= {"q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens",
                                                    "input_layernorm", "post_attention_layernorm", "norm", "lm_head"}
    for name in rejected:
        with pytest.raises(UnsupportedParameter, match=name.replace(".", r"\.")):
            align_prefix_grad(name, state[name], state[name].shape)
    for name in accepted:
        assert align_prefix_grad(name, state[name], state[name].shape) is state[name]
