"""One peer, and the send half every peer runs: from its tokens to its payload.

`gradients` is the definition of a peer's gradient: its model, at its tiers and helper
neurons, forward and backward on its batch, accumulated over Psyche's micro-batches.
sim/engine.py may compute a group's gradients batched instead; properties/test_engine.py
holds the batched ones to these.

`compress_group` is every stage after the gradient, for a group of peers of one shape,
a group of one included: clipping, narrowing to the tier, helper slabs, the NaN guard,
the DisTrO step and the payload. Serial and batched training differ in nothing else.
"""
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sim.align import prefix_dim
from sim.distro import DistroState, step_stacked
from sim.model import MatFormerLM, is_mlp_sliced, local_shapes, mlp_layer, parameters_by_name
from sim.wire import Payload

log = logging.getLogger(__name__)


@dataclass
class Peer:
    id: int
    tiers: tuple[int, ...]
    helper_fraction: float
    state: DistroState
    model: MatFormerLM | None = None   # None in shared-weights mode


def micro_batches(tokens: torch.Tensor, micro_batch_size: int | None) -> tuple[torch.Tensor, ...]:
    """A batch [B, ...] as Psyche's trainer splits it (shared/modeling/src/trainer.rs):
    ceil(B / m) steps, then torch's chunk into that many pieces (pieces of ceil(B / steps),
    the last smaller: 5 at m = 2 is 2, 2, 1; 6 at m = 4 is 3, 3). Each piece's loss is
    divided by the number of pieces, so unequal pieces weigh their sequences unequally."""
    if micro_batch_size is None or micro_batch_size >= tokens.shape[0]:
        return (tokens,)
    steps = -(-tokens.shape[0] // micro_batch_size)
    return tokens.chunk(steps, 0)


def backward(model: MatFormerLM, tokens: torch.Tensor, micro_batch_size: int | None) -> float:
    """Forward and backward of `model` (at its tiers and helpers) on a batch [B, T + 1] of
    next-token targets, accumulated into its .grad over micro-batches: the loss it reports."""
    model.zero_grad(set_to_none=True)
    pieces, loss = micro_batches(tokens, micro_batch_size), 0.0
    for piece in pieces:
        part = model(piece[:, :-1], piece[:, 1:])[1] / len(pieces)
        part.backward()
        loss += part.item()
    return loss


def gradients(models: Sequence[MatFormerLM], tokens: torch.Tensor, micro_batch_size: int | None = None
              ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The definition: each model trains on its batch (tokens [peers, B, T + 1]) one after
    another. Returns the gradients of every stored parameter stacked [peers, *shape]
    (zero outside what the tiers and helpers train), and each peer's loss."""
    grads, losses = [], []
    for model, batch in zip(models, tokens):
        losses.append(backward(model, batch, micro_batch_size))
        grads.append({name: p.grad if p.grad is not None else torch.zeros_like(p)
                      for name, p in parameters_by_name(model).items()})
    if len(grads) == 1:   # a view, not a copy
        return {name: g.unsqueeze(0) for name, g in grads[0].items()}, losses
    return {name: torch.stack([g[name] for g in grads]) for name in grads[0]}, losses


def clip_stacked(grads: dict[str, torch.Tensor], max_norm: float | None) -> dict[str, torch.Tensor]:
    """Psyche's clip_grad_norm, for peers stacked along dim 0 ({name: [peers, *shape]}): each
    peer's whole gradient (helper neurons included) scaled by torch's clip coefficient,
    max_norm / (norm + 1e-6), at most 1. None or 0: no clipping."""
    if not max_norm:
        return grads
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {name: g * scale.view(-1, *[1] * (g.ndim - 1)) for name, g in grads.items()}


def compress_group(model: MatFormerLM, ids: Sequence[int], round_: int, grads: dict[str, torch.Tensor],
                   losses: Sequence[float], states: Sequence[DistroState], lr: float,
                   poisoned: Sequence[int] = ()) -> list[tuple[Payload | None, float]]:
    """(payload, loss) of each peer of a group of one shape (`model` at that shape: its
    tiers and helper neurons), from their stacked full gradients.

    The NaN guard: a non-finite gradient is never compressed, since it would poison the
    peer's DisTrO state for good (and 1-bit signs would hide it from every receiver); the
    payload is withheld (None) and the state left as it was. `poisoned` (positions in the
    group) injects such a gradient: the nan fault."""
    config = states[0].config
    grads = clip_stacked(grads, config.clip_grad_norm)
    helpers, shapes = model.helpers, local_shapes(model.cfg, model.layer_tiers)
    local = {name: g.narrow(prefix_dim(name) + 1, 0, shapes[name][prefix_dim(name)]) if is_mlp_sliced(name) else g
             for name, g in grads.items()}
    slabs = {name: g.index_select(prefix_dim(name) + 1, helpers[mlp_layer(name)].to(g.device))
             for name, g in grads.items() if is_mlp_sliced(name) and mlp_layer(name) in helpers}
    if poisoned:
        first = next(iter(local.values()))
        for i in poisoned:
            first[(i,) + (0,) * (first.ndim - 1)] = float("nan")
    if log.isEnabledFor(logging.DEBUG):
        for i, peer in enumerate(ids):
            log_gradient_shapes(model, {name: g[i] for name, g in local.items()}, peer, round_)
    finite = torch.stack([g.flatten(1).isfinite().all(1) for g in [*local.values(), *slabs.values()]]).all(0).tolist()
    ok = [i for i in range(len(ids)) if finite[i]]
    results: list[tuple[Payload | None, float]] = [(None, loss) for loss in losses]   # withheld unless stepped
    if not ok:
        return results
    take = (lambda t: t) if len(ok) == len(ids) else (lambda t: t[ok])
    stepping = [states[i] for i in ok]
    sent = {name: step_stacked(stepping, name, take(g), lr)[0] for name, g in local.items()}
    helper_sent = {name: step_stacked(stepping, "helper:" + name, take(g), lr, anchor=helpers[mlp_layer(name)])[0]
                   for name, g in slabs.items()}
    for j, i in enumerate(ok):
        results[i] = (make_payload(ids[i], round_, model.layer_tiers, {n: s[j] for n, s in sent.items()},
                                   config.quantize_1bit, helpers, {n: s[j] for n, s in helper_sent.items()}), losses[i])
    return results


def train_and_compress(model: MatFormerLM, state: DistroState, tokens: torch.Tensor, lr: float,
                       peer: int, round_: int, micro_batch_size: int | None = None) -> tuple[Payload | None, float]:
    """One peer's send half outside a network (a group of one): gradient, then every stage
    of `compress_group`. Returns (payload, loss)."""
    grads, losses = gradients([model], tokens.unsqueeze(0), micro_batch_size)
    return compress_group(model, [peer], round_, grads, losses, [state], lr)[0]


def train_locally(model: MatFormerLM, optimizer: torch.optim.Optimizer | None, tokens: torch.Tensor, lr: float,
                  max_norm: float | None, micro_batch_size: int | None = None) -> float:
    """A Psyche client under AdamW (`optimizer`) or Dummy (None): forward+backward on its
    batch, then its own optimizer step on its own replica; nothing leaves the peer."""
    if optimizer is None:
        with torch.no_grad():
            pieces = micro_batches(tokens, micro_batch_size)
            return sum(model(p[:, :-1], p[:, 1:])[1].item() / len(pieces) for p in pieces)
    loss = backward(model, tokens, micro_batch_size)
    if max_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss


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
