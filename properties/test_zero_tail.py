"""Zero-tail gradients over random models of both styles and every valid
(per-layer) tier: the chapter's matformer_mlp_has_zero_tail_grads, generalized."""
import dataclasses

import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.profiles import scaled
from properties.records import describe
from properties.strategies import layer_tier_maps, model_configs
from sim.model import MatFormerLM, build_model, is_mlp_sliced, load_prefix, local_shapes, mlp_layer, param_count
from sim.align import prefix_dim
from sim.tiers import layer_widths


@st.composite
def tiered_models(draw):
    cfg = draw(model_configs())
    tiers = draw(layer_tier_maps(cfg.intermediate_size, cfg.num_hidden_layers))
    return cfg, tiers, draw(st.integers(0, 2**16)), draw(st.integers(1, 3)), draw(st.integers(2, 8))


def poison_suffix(model, widths):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_mlp_sliced(name):
                dim, width = prefix_dim(name), widths[mlp_layer(name)]
                param.narrow(dim, width, param.shape[dim] - width).fill_(float("nan"))


@scaled(0.5)
@given(tiered_models())
def test_tier_grads_are_zero_outside_the_prefix_and_equal_an_independent_tier_model(case):
    """Full-width model run at a tier (narrow views) vs a model built at that width holding copies
    of the prefix weights: same loss, every gradient equal on the prefix, exactly zero on the tail.
    The full model's suffix is poisoned with NaN first, so a tier that reads its suffix at all shows.
    Catches: a copy instead of a view (no prefix grads), masking activations instead of slicing
    (0 * NaN reaches the loss), scaling by width, any leakage into the suffix."""
    cfg, tiers, seed, batch, seq = case
    describe(tiers=list(tiers), seed=seed, model=dataclasses.asdict(cfg))
    full = build_model(cfg, tiers, seed=seed, device="cpu", dtype=torch.float64)
    widths = layer_widths(cfg.intermediate_size, tiers, cfg.num_hidden_layers)
    independent = load_prefix(MatFormerLM(cfg, stored_widths=widths).double(), full.state_dict())
    poison_suffix(full, widths)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    targets = tokens.roll(-1, dims=1)
    full_loss, independent_loss = full(tokens, targets)[1], independent(tokens, targets)[1]
    full_loss.backward()
    independent_loss.backward()
    torch.testing.assert_close(full_loss, independent_loss, rtol=1e-12, atol=1e-12)

    reference = dict(independent.named_parameters())
    for name, param in full.named_parameters():
        grad, expected = param.grad, reference[name].grad
        if is_mlp_sliced(name):
            dim, width = prefix_dim(name), widths[mlp_layer(name)]
            tail = grad.narrow(dim, width, grad.shape[dim] - width)
            assert torch.count_nonzero(tail) == 0, f"{name}: gradient leaked into the suffix"
            grad = grad.narrow(dim, 0, width)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


@given(model_configs(), st.data())
def test_param_count_equals_the_parameters_of_a_model_built_at_that_width(cfg, data):
    """Catches: the tier table miscounting biases, tied heads or the nanogpt MLP, and the wire
    validating a peer against shapes its tier does not hold."""
    tiers = data.draw(layer_tier_maps(cfg.intermediate_size, cfg.num_hidden_layers))
    model = MatFormerLM(cfg, stored_widths=layer_widths(cfg.intermediate_size, tiers, cfg.num_hidden_layers))
    assert param_count(cfg, tiers) == sum(p.numel() for p in model.parameters())
    assert local_shapes(cfg, tiers) == {name: tuple(p.shape) for name, p in model.named_parameters()}
