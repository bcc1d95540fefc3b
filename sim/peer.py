"""One peer: its tier, its replica (or a view of shared weights), its DisTrO state."""
import logging
from dataclasses import dataclass

import torch

from sim.distro import DistroState
from sim.model import MatFormerLM, helper_grads, local_grads, mlp_layer
from sim.wire import Payload

log = logging.getLogger(__name__)


@dataclass
class Peer:
    id: int
    tiers: tuple[int, ...]
    helper_fraction: float
    state: DistroState
    model: MatFormerLM | None = None   # None in shared-weights mode


def train_and_compress(model: MatFormerLM, state: DistroState, tokens: torch.Tensor, lr: float,
                       peer: int, round_: int, poison: bool = False) -> tuple[Payload | None, float]:
    """Forward+backward on `tokens` (next-token targets) at the model's tiers (and helper
    neurons, when set), then one DisTrO step per parameter and helper slab. Returns (payload, loss).

    The guard: a non-finite gradient is never compressed, since it would poison this
    peer's DisTrO state for good (and 1-bit signs would hide it from every receiver);
    the payload is withheld (None) instead. `poison` injects such a gradient (the nan fault)."""
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], tokens[:, 1:])[1]
    loss.backward()
    clip_gradient(model, state.config.clip_grad_norm)
    grads = local_grads(model)
    if log.isEnabledFor(logging.DEBUG):
        log_gradient_shapes(model, grads, peer, round_)
    helpers, slabs = model.helpers, helper_grads(model)
    if poison:
        next(iter(grads.values())).view(-1)[0] = float("nan")
    if not all(bool(torch.isfinite(g).all()) for g in [*grads.values(), *slabs.values()]):
        return None, loss.item()
    params = {name: state.step(name, grad, lr)[0] for name, grad in grads.items()}
    helper_params = {name: state.step("helper:" + name, grad, lr, anchor=helpers[mlp_layer(name)])[0]
                     for name, grad in slabs.items()}
    return make_payload(peer, round_, model.layer_tiers, params, state.config.quantize_1bit, helpers,
                        helper_params), loss.item()


def clip_gradient(model: MatFormerLM, max_norm: float | None) -> None:
    """Psyche's clip_grad_norm: each peer scales its own whole gradient (helper neurons
    included) to norm at most `max_norm` (None or 0: no clipping)."""
    if max_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def clip_stacked(grads: dict[str, torch.Tensor], max_norm: float | None) -> dict[str, torch.Tensor]:
    """`clip_gradient` for peers stacked along dim 0 ({name: [peers, *shape]}): each peer's
    whole gradient scaled by torch's clip coefficient, max_norm / (norm + 1e-6), at most 1."""
    if not max_norm:
        return grads
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {name: g * scale.view(-1, *[1] * (g.ndim - 1)) for name, g in grads.items()}


def train_locally(model: MatFormerLM, optimizer: torch.optim.Optimizer | None, tokens: torch.Tensor, lr: float,
                  max_norm: float | None) -> float:
    """A Psyche client under AdamW (`optimizer`) or Dummy (None): forward+backward on its
    shard, then its own optimizer step on its own replica; nothing leaves the peer."""
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], tokens[:, 1:])[1]
    if optimizer is not None:
        loss.backward()
        clip_gradient(model, max_norm)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    return loss.item()


def make_payload(peer: int, round_: int, tiers, params: dict, quantized: bool, helpers: dict[int, torch.Tensor],
                 helper_params: dict) -> Payload:
    """What a peer sends: its compressed parameters, and in helper mode its neurons and slabs."""
    return Payload(peer, round_, tiers, params, quantized, {layer: neurons.cpu() for layer, neurons in helpers.items()},
                   helper_params)


def log_gradient_shapes(model: MatFormerLM, grads: dict[str, torch.Tensor], peer: int, round_: int) -> None:
    """The chapter's gradient-shape diagnostic (`--log-level debug`)."""
    full = dict(model.named_parameters())
    for name, grad in grads.items():
        log.debug("gradient peer=%d round=%d parameter=%s local_shape=%s full_shape=%s",
                  peer, round_, name, list(grad.shape), list(full[name].shape))
