"""Aggregation and compression on nanogpt-20m-run, as ratios in one run:
- 32 same-shaped payloads: the heterogeneous path (each semantics) against the
  homogeneous fast path batch_decompress (goal for COEFF_MEAN: at most 1.5x);
- 32 mixed-tier payloads (8 tier-0 + 24 tier-1) through the heterogeneous path;
- one peer's DisTrO step (compress + decompress for error feedback) against
  that peer's forward+backward (goal: at most 0.25x), on the config's per-peer
  batch (global batch 12 over min_clients 3: 4x512 tokens) and on one sequence."""
import pytest
import torch

from properties.strategies import random_payload
from sim.aggregate import MeanSemantics, aggregate, homogeneous_update
from sim.config import load_config
from sim.distro import DistroState, Sparse
from sim.model import build_model, full_shapes, local_grads, random_tokens
from sim.wire import Payload

CFG = load_config("nanogpt-20m-run")
LAYERS = CFG.model.num_hidden_layers
SHAPES = full_shapes(CFG.model)


def peers(tiers_of):
    """32 payloads: one random payload per tier, rotated by the peer id within every block
    (indices stay distinct), so peers overlap partially as real top-k sets do."""
    base = {t: random_payload(CFG.model, CFG.distro, (t,) * LAYERS, peer=0, seed=t) for t in set(map(tiers_of, range(32)))}
    out = []
    for i in range(32):
        template = base[tiers_of(i)]
        params = {n: Sparse(s.grid, (s.indices + i) % s.grid.block_numel, s.values.roll(i, dims=-1))
                  for n, s in template.params.items()}
        out.append(Payload(i, 0, template.tiers, params, template.quantized))
    return out


@pytest.fixture(scope="module")
def same_shaped():
    return peers(lambda i: 0)


@pytest.fixture(scope="module")
def mixed():
    return peers(lambda i: 0 if i < 8 else 1)


GROUP = "aggregate 32 payloads, nanogpt-20m-run"


@pytest.mark.benchmark(group=GROUP)
def test_bench_fast_path_batch_decompress(benchmark, same_shaped):
    updates = benchmark.pedantic(homogeneous_update, args=(same_shaped,), rounds=5, warmup_rounds=1)
    assert updates.keys() == SHAPES.keys()


@pytest.mark.parametrize("semantics", list(MeanSemantics), ids=lambda s: s.value)
@pytest.mark.benchmark(group=GROUP)
def test_bench_heterogeneous_path_same_shapes(benchmark, same_shaped, semantics):
    result = benchmark.pedantic(aggregate, args=(same_shaped, SHAPES, CFG.distro, semantics), rounds=5, warmup_rounds=1)
    assert result.contributing_peers == 32


@pytest.mark.benchmark(group=GROUP)
def test_bench_heterogeneous_path_mixed_tiers(benchmark, mixed):
    result = benchmark.pedantic(aggregate, args=(mixed, SHAPES, CFG.distro), rounds=5, warmup_rounds=1)
    assert result.contributing_peers == 32 and not result.rejected


PEER_BATCH = CFG.client_batch
PEER_GROUP = "one peer, nanogpt-20m-run"


@pytest.fixture(scope="module")
def trained_peer():
    model = build_model(CFG.model, 0, seed=0, device="cpu")
    return model, random_tokens(CFG.model, PEER_BATCH, CFG.seq_len, seed=1, device="cpu")


def forward_backward(model, tokens):
    model.zero_grad(set_to_none=True)
    model(tokens, tokens.roll(-1, dims=1))[1].backward()


def distro_step(model):
    state = DistroState.fresh(CFG.distro)
    return {name: state.step(name, grad, 1e-3)[0] for name, grad in local_grads(model).items()}


@pytest.mark.parametrize("sequences", [PEER_BATCH, 1], ids=lambda n: f"{n}x512-baseline")
@pytest.mark.benchmark(group=PEER_GROUP)
def test_bench_peer_forward_backward_baseline(benchmark, trained_peer, sequences):
    model, tokens = trained_peer
    sequences = 1 if benchmark.disabled else sequences   # run once as a test (xdist): the same code, a smoke size
    benchmark.pedantic(forward_backward, args=(model, tokens[:sequences]), rounds=5, warmup_rounds=1)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.benchmark(group=PEER_GROUP)
def test_bench_peer_compress_and_decompress(benchmark, trained_peer):
    model, tokens = trained_peer
    forward_backward(model, tokens[:1] if benchmark.disabled else tokens)   # smoke size as a test
    sent = benchmark.pedantic(distro_step, args=(model,), rounds=5, warmup_rounds=1)
    assert sent.keys() == SHAPES.keys() and all(torch.isfinite(s.values).all() for s in sent.values())
