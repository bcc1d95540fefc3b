"""One peer's round: train its shard at its tier, compress, build the payload."""
import torch

from sim.distro import DistroState
from sim.model import MatFormerLM, local_grads
from sim.wire import Payload


def train_and_compress(model: MatFormerLM, state: DistroState, tokens: torch.Tensor, lr: float,
                       peer: int, round_: int) -> tuple[Payload, float]:
    """Forward+backward on `tokens` (next-token targets) at the model's tiers, then one
    DisTrO step per parameter. Returns the payload and the loss."""
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], tokens[:, 1:])[1]
    loss.backward()
    params = {name: state.step(name, grad, lr)[0] for name, grad in local_grads(model).items()}
    return Payload(peer, round_, model.layer_tiers, params, state.config.quantize_1bit), loss.item()
