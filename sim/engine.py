"""The peers' half of a round: each trainer of the round trains on the sequences assigned
to it and compresses, peers of one shape as one group.

One path for groups of any size, a group of one included: the group's tokens
(`Network.tokens`: Psyche's assignment, sim/assignment.py), its gradients, then every
stage after them (`sim.peer.compress_group`: clipping, narrowing, helper slabs, the NaN
guard, the DisTrO step, the payload). Only the gradients differ between serial and
batched training: `sim.peer.gradients` runs each peer's model in turn (the definition);
`batched_gradients` runs the group as one torch.func computation, `functional_call` +
`grad` vmapped over the stacked weights of their replicas and their stacked batches
(shared weights: over the batches alone). properties/test_engine.py holds the batched
gradients to the serial ones.

`batching`: "off" computes every gradient serially; "on" batches every group of two or
more; "auto" does so where batching pays (`auto_batches`: small models), at most
AUTO_GROUP peers at a time, and trains peers in turn on large models.

Bitwise: in float64 the batched gradients equal the serial ones to round-off (the property
checks 1e-12). In float32 they may differ in the last bits: vmap turns each peer's matrix
products into one batched product and each peer's reductions into reductions over a
batched tensor, which BLAS may block and sum in another order. Each path is deterministic
on CPU, so a run is bit-reproducible with itself whichever it takes; a run with batching
"off" equals the distributed backend (one peer a process) bit for bit.
"""
from collections.abc import Sequence

import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from sim.errors import ConfigError
from sim.faults import kinds
from sim.model import param_count, parameters_by_name
from sim.peer import Peer, compress_group, gradients, micro_batches
from sim.wire import Payload

BATCHING = ("auto", "on", "off")


AUTO_WORK = 2 ** 30   # parameters x tokens per peer up to which `auto` batches
AUTO_GROUP = 16       # peers `auto` batches at most at once (their gradients coexist)


def auto_batches(network, batch: int) -> bool:
    """Whether batching pays for peers training `batch` sequences (benchmarks/test_bench_engine.py,
    README "Batched peers"): on a small model a peer's step is a few hundred small kernel
    calls and a batch of them runs in the time of a few peers (tiny and test-nanogpt-small:
    1.2-1.3x faster from 2 peers). On nanogpt-20m-run (19M parameters x 4 x 512 tokens) two
    batched peers took 1.85x as long as two in turn: the big matrix products already use
    the machine, and the math attention kernel vmap needs materializes 512 x 512 scores."""
    config = network.config
    return param_count(config.model) * batch * config.seq_len <= AUTO_WORK


def check_batching(batching: str) -> str:
    if batching not in BATCHING:
        raise ConfigError(f"peer batching {batching!r} is unknown: valid are {', '.join(BATCHING)}")
    return batching


def train_peers(network, peers: Sequence[Peer], round_: int, faults: dict, batching: str = "auto"
                ) -> list[tuple[Payload | None, float]]:
    """(payload, loss) of every peer, in order; each must have sequences assigned."""
    done = {}
    for group, batched in groups(network, peers, round_, batching):
        done.update(zip((p.id for p in group), train_group(network, group, round_, faults, batched)))
    return [done[p.id] for p in peers]


def groups(network, peers: Sequence[Peer], round_: int, batching: str) -> list[tuple[list[Peer], bool]]:
    """The round's groups, each with whether its gradients are batched: peers of one shape
    and batch size together where `batching` says so, else each peer alone."""
    sizes = {p.id: len(network.assignment(round_)[p.id]) for p in peers}
    if check_batching(batching) == "off":
        return [([p], False) for p in peers]
    together: dict[tuple, list[Peer]] = {}
    for peer in peers:
        together.setdefault((shape_of(network, peer, round_), sizes[peer.id]), []).append(peer)
    result = []
    for (_, size), members in together.items():
        if batching == "auto" and not auto_batches(network, size):
            result.extend(([p], False) for p in members)
            continue
        step = AUTO_GROUP if batching == "auto" else len(members)   # a batch holds every member's gradient
        result.extend((members[i:i + step], len(members[i:i + step]) >= 2) for i in range(0, len(members), step))
    return result


def shape_of(network, peer: Peer, round_: int) -> tuple:
    """What a peer's computation depends on besides its weights and data."""
    model = network.shared if network.shared is not None else peer.model
    helpers = network.helpers(peer, round_)
    return (peer.tiers, model.stored_widths,
            tuple((layer, tuple(neurons.tolist())) for layer, neurons in sorted(helpers.items())))


def train_group(network, group: Sequence[Peer], round_: int, faults: dict, batched: bool
                ) -> list[tuple[Payload | None, float]]:
    """The send half of peers of one shape and batch size: (payload, loss) of each."""
    config = network.config
    models = [network.shared if network.shared is not None else p.model for p in group]
    for model, peer in zip(models, group):
        model.set_tiers(peer.tiers).set_helpers(network.helpers(peer, round_))
    tokens = network.tokens(group, round_)
    if batched:
        grads, losses = batched_gradients(models[0], None if network.shared is not None else models, tokens,
                                          config.micro_batch_size)
    else:
        grads, losses = gradients(models, tokens, config.micro_batch_size)
    poisoned = [i for i, p in enumerate(group) if "nan" in kinds(faults.get(p.id)) and config.distro.quantize_1bit]
    return compress_group(models[0], [p.id for p in group], round_, grads, losses, [p.state for p in group],
                          config.lr(round_), poisoned)


def batched_gradients(model, replicas, tokens: torch.Tensor, micro_batch_size: int | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """`sim.peer.gradients` of a group as one computation: `model` gives the structure (its
    tiers and helpers set), `replicas` the weights of each peer (None: `model`'s, shared),
    tokens [peers, B, T + 1]. The same micro-batches, each piece's loss over their count."""
    named = parameters_by_name(model)
    if replicas is None:
        params = {name: p.detach() for name, p in named.items()}
    else:
        stores = [parameters_by_name(m) for m in replicas]
        params = {name: torch.stack([store[name].detach() for store in stores]) for name in named}
    pieces = micro_batches(tokens.transpose(0, 1), micro_batch_size)   # split the batch axis, not the peers'

    def loss_of(weights, batch):
        return functional_call(model, weights, (batch[:, :-1], batch[:, 1:]))[1] / len(pieces)

    grads, losses = None, [0.0] * tokens.shape[0]
    # The math kernel of attention: CPU's flash kernel has no batching rule, and vmap would run
    # it peer by peer.
    with sdpa_kernel(SDPBackend.MATH):
        for piece in pieces:
            g, loss = vmap(grad_and_value(loss_of), in_dims=(None if replicas is None else 0, 0))(
                params, piece.transpose(0, 1))
            grads = g if grads is None else {name: grads[name] + g[name] for name in grads}
            losses = [total + part for total, part in zip(losses, loss.tolist())]   # as `backward` adds them
    return grads, losses
