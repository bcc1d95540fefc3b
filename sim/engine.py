"""The peers' half of a round: each present peer trains on its shard and compresses, one
peer at a time (the definition) or peers of one shape in one batched computation.

Peers whose models run the same computation (the same per-layer tiers, helper neurons and
stored widths) differ only in their weights and data. Their forward/backward is one
torch.func computation: `functional_call` + `grad`, vmapped over the stacked weights of
their replicas and their stacked batches (shared weights: over the batches alone). Their
DisTrO steps are one stacked step per parameter (`sim.distro.step_stacked`), each peer
keeping its own state, and their payloads are then built exactly as one peer's are.
`Network.train`, one peer at a time, stays the definition: properties/test_engine.py checks
every batched gradient, loss and payload against it.

`batching`: "off" trains every peer alone; "on" batches every group of two or more; "auto"
does so where batching pays (`auto_batches`: small models), at most AUTO_GROUP peers at a
time, and trains peers in turn on large models.

Bitwise: in float64 the batched results equal the serial ones to round-off (the property
checks 1e-12). In float32 they may differ in the last bits: vmap turns each peer's matrix
products into one batched product and each peer's reductions into reductions over a
batched tensor, which BLAS may block and sum in another order. Each path is deterministic
on CPU, so a run is bit-reproducible with itself whichever it takes.
"""
import logging
from collections.abc import Sequence

import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from sim.align import prefix_dim
from sim.data import shards
from sim.distro import step_stacked
from sim.errors import ConfigError
from sim.model import is_mlp_sliced, local_shapes, mlp_layer, param_count, parameters_by_name
from sim.peer import Peer, clip_stacked, log_gradient_shapes, make_payload
from sim.peer import log as peer_log
from sim.wire import Payload

BATCHING = ("auto", "on", "off")


AUTO_WORK = 2 ** 30   # parameters x tokens per peer up to which `auto` batches
AUTO_GROUP = 16       # peers `auto` batches at most at once (their gradients coexist)


def auto_batches(network, round_: int) -> bool:
    """Whether batching pays for this network's peers (benchmarks/test_bench_engine.py,
    README "Batched peers"): on a small model a peer's step is a few hundred small kernel
    calls and a batch of them runs in the time of a few peers (tiny and test-nanogpt-small:
    1.2-1.3x faster from 2 peers). On nanogpt-20m-run (19M parameters x 4 x 512 tokens) two
    batched peers took 1.85x as long as two in turn: the big matrix products already use
    the machine, and the math attention kernel vmap needs materializes 512 x 512 scores."""
    config = network.config
    return param_count(config.model) * network.batch(round_) * config.seq_len <= AUTO_WORK


def check_batching(batching: str) -> str:
    if batching not in BATCHING:
        raise ConfigError(f"peer batching {batching!r} is unknown: valid are {', '.join(BATCHING)}")
    return batching


def train_peers(network, peers: Sequence[Peer], round_: int, faults: dict, batching: str = "auto"
                ) -> list[tuple[Payload | None, float]]:
    """(payload, loss) of every peer, in order; batched by shape where `batching` says so."""
    if check_batching(batching) == "off" or len(peers) < 2 or (batching == "auto" and not auto_batches(network, round_)):
        return [network.train(p, round_, faults.get(p.id)) for p in peers]
    groups: dict[tuple, list[Peer]] = {}
    for peer in peers:
        groups.setdefault(shape_of(network, peer, round_), []).append(peer)
    if batching == "auto":   # each batch holds every member's gradient at once: bound the memory
        groups = {(shape, i): members[i:i + AUTO_GROUP] for shape, members in groups.items()
                  for i in range(0, len(members), AUTO_GROUP)}
    done = {}
    for group in groups.values():
        if len(group) >= 2:
            done.update(zip((p.id for p in group), train_group(network, group, round_, faults)))
        else:
            done.update((p.id, network.train(p, round_, faults.get(p.id))) for p in group)
    return [done[p.id] for p in peers]


def shape_of(network, peer: Peer, round_: int) -> tuple:
    """What a peer's computation depends on besides its weights and data."""
    model = network.shared if network.shared is not None else peer.model
    helpers = network.helpers(peer, round_)
    return (peer.tiers, model.stored_widths,
            tuple((layer, tuple(neurons.tolist())) for layer, neurons in sorted(helpers.items())))


def train_group(network, group: Sequence[Peer], round_: int, faults: dict) -> list[tuple[Payload | None, float]]:
    """`Network.train` for peers of one shape, as one batched computation."""
    config = network.config
    model, helpers, local, slabs, losses = group_gradients(network, group, round_)
    poisoned = [i for i, p in enumerate(group) if faults.get(p.id) is not None and faults[p.id].kind == "nan"
                and config.distro.quantize_1bit]
    for i in poisoned:   # the nan fault's poison, as Network.train injects it
        next(iter(local.values()))[i].view(-1)[0] = float("nan")
    finite = torch.stack([g.flatten(1).isfinite().all(1) for g in [*local.values(), *slabs.values()]]).all(0).tolist()
    if peer_log.isEnabledFor(logging.DEBUG):
        for i, peer in enumerate(group):
            log_gradient_shapes(model, {name: g[i] for name, g in local.items()}, peer.id, round_)
    ok = [i for i in range(len(group)) if finite[i]]
    results: list[tuple[Payload | None, float]] = [(None, loss) for loss in losses]   # withheld unless stepped
    if not ok:
        return results
    take = (lambda t: t) if len(ok) == len(group) else (lambda t: t[ok])
    states, lr = [group[i].state for i in ok], config.lr(round_)
    sent = {name: step_stacked(states, name, take(g), lr)[0] for name, g in local.items()}
    helper_sent = {name: step_stacked(states, "helper:" + name, take(g), lr, anchor=helpers[mlp_layer(name)])[0]
                   for name, g in slabs.items()}
    for j, i in enumerate(ok):
        results[i] = (make_payload(group[i].id, round_, model.layer_tiers, {n: s[j] for n, s in sent.items()},
                                   config.distro.quantize_1bit, helpers, {n: s[j] for n, s in helper_sent.items()}),
                      losses[i])
    return results


def group_gradients(network, group: Sequence[Peer], round_: int):
    """(model, helper neurons, local gradients, helper slabs, losses) of peers of one shape:
    gradients stacked [peers, *local shape] as `local_grads` and `helper_grads` give one peer's."""
    config, shared = network.config, network.shared is not None
    model = network.shared if shared else group[0].model   # the structure; the weights are passed in
    model.set_tiers(group[0].tiers).set_helpers(network.helpers(group[0], round_))
    helpers = model.helpers   # as the serial path reads them: layers with no helper neuron left out
    named = parameters_by_name(model)
    if shared:
        params = {name: p.detach() for name, p in named.items()}
    else:
        replicas = [parameters_by_name(p.model) for p in group]
        params = {name: torch.stack([replica[name].detach() for replica in replicas]) for name in named}
    tokens = stacked_shards(network, group, round_)

    def loss_of(weights, batch):
        return functional_call(model, weights, (batch[:, :-1], batch[:, 1:]))[1]

    # The math kernel of attention: CPU's flash kernel has no batching rule, and vmap would run
    # it peer by peer.
    with sdpa_kernel(SDPBackend.MATH):
        grads, losses = vmap(grad_and_value(loss_of), in_dims=(None if shared else 0, 0))(params, tokens)
    grads = clip_stacked(grads, config.distro.clip_grad_norm)
    shapes = local_shapes(config.model, model.layer_tiers)
    local = {name: g.narrow(prefix_dim(name) + 1, 0, shapes[name][prefix_dim(name)]) if is_mlp_sliced(name) else g
             for name, g in grads.items()}
    slabs = {name: g.index_select(prefix_dim(name) + 1, helpers[mlp_layer(name)].to(g.device))
             for name, g in grads.items() if is_mlp_sliced(name) and mlp_layer(name) in helpers}
    return model, helpers, local, slabs, losses.tolist()


def stacked_shards(network, group: Sequence[Peer], round_: int) -> torch.Tensor:
    """The group's shards, [peers, batch, seq_len + 1], in the group's order."""
    return shards(network.source, network.seed, round_, [p.id for p in group], network.batch(round_),
                  network.config.seq_len + 1).to(network.device)
