"""A llama-style matsim model is an HF LlamaForCausalLM: same names, shapes and
logits. transformers is the reference here only (the `test` extra)."""
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sim.config import load_config
from sim.model import MatFormerLM, build_model, load_prefix, random_tokens

TINY = load_config("tiny").model
VARIANTS = {
    "gqa": TINY,
    "mha-tied": dataclasses.replace(TINY, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-bias": dataclasses.replace(TINY, num_key_value_heads=1, mlp_bias=True, hidden_size=48,
                                    num_attention_heads=6, intermediate_size=96),
}


def hf_model(cfg) -> LlamaForCausalLM:
    hf = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    return LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="eager")).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_state_dict_loads_strict_into_transformers_and_gives_same_logits(variant):
    cfg = VARIANTS[variant]
    ours = build_model(cfg, seed=3, device="cpu").eval()
    reference = hf_model(cfg)
    reference.load_state_dict(ours.state_dict(), strict=True)
    tokens = random_tokens(cfg, 2, 12, seed=4, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], reference(tokens).logits, rtol=1e-5, atol=1e-5)


def test_tier_model_equals_hf_model_of_the_narrow_width():
    """A tier-1 forward over narrow views is the HF model whose FFN is the prefix."""
    full = build_model(TINY, tiers=1, seed=5, device="cpu").eval()
    narrow_cfg = dataclasses.replace(TINY, intermediate_size=TINY.intermediate_size // 2)
    sliced = load_prefix(MatFormerLM(narrow_cfg), full.state_dict())
    reference = hf_model(narrow_cfg)
    reference.load_state_dict(sliced.state_dict(), strict=True)
    tokens = random_tokens(TINY, 2, 12, seed=6, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(full(tokens)[0], reference(tokens).logits, rtol=1e-5, atol=1e-5)
