"""The verification chapter's checklist says the heterogeneous normalization
"matches batch_decompress mean". Under PEER_MEAN (Psyche's code) it does not:
a coefficient sent by k of N peers becomes value/N there, but the mean of the
k values in batch_decompress. These tests pin that discrepancy."""
import torch

from sim.aggregate import MeanSemantics, aggregate, homogeneous_update
from sim.config import DistroConfig, load_config
from sim.distro import ChunkGrid, DistroState, Sparse
from sim.model import build_model, full_shapes, random_tokens
from sim.peer import train_and_compress
from sim.wire import Payload

NAME = "model.layers.0.self_attn.q_proj.weight"


def one_coefficient(peer: int, coefficient: int) -> Payload:
    grid = ChunkGrid.of((1, 4), chunk=4)
    return Payload(peer, 0, (0,), {NAME: Sparse(grid, torch.tensor([[[coefficient]]]), torch.tensor([[[1.0]]]))}, False)


def test_peer_mean_differs_from_batch_decompress_mean_on_same_shaped_payloads():
    """Peer A sends coefficient 0, peer B coefficient 1, both +1. batch_decompress averages
    each over the one peer that sent it (1.0); PEER_MEAN divides by both peers (0.5)."""
    payloads = [one_coefficient(0, 0), one_coefficient(1, 1)]
    distro = DistroConfig(compression_chunk=4, compression_topk=1, quantize_1bit=False)
    shapes = {NAME: (1, 4)}
    grid = ChunkGrid.of((1, 4), 4)
    fast = homogeneous_update(payloads)[NAME]
    coeff = aggregate(payloads, shapes, distro, MeanSemantics.COEFF_MEAN).updates[NAME]
    peer = aggregate(payloads, shapes, distro, MeanSemantics.PEER_MEAN).updates[NAME]
    assert torch.equal(coeff, fast)
    torch.testing.assert_close(grid.encode(coeff), torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]))
    torch.testing.assert_close(grid.encode(peer), torch.tensor([[[0.5, 0.5, 0.0, 0.0]]]))
    assert not torch.allclose(coeff, peer)


def test_the_discrepancy_changes_applied_signs_on_real_gradients():
    """Real peers (tiers 0,1,1 of `tiny`): the sign of the applied update differs between
    the two semantics on some elements, so the choice is visible in training, not only
    in magnitudes. scripts/compare_semantics.py measures the fraction on nanogpt-20m-run."""
    cfg = load_config("tiny")
    payloads = []
    for peer, tier in enumerate((0, 1, 1)):
        model = build_model(cfg.model, tier, seed=0, device="cpu")
        tokens = random_tokens(cfg.model, 2, cfg.seq_len + 1, seed=peer, device="cpu")
        payloads.append(train_and_compress(model, DistroState.fresh(cfg.distro), tokens, 1e-3, peer, 0)[0])
    shapes = full_shapes(cfg.model)
    coeff = aggregate(payloads, shapes, cfg.distro, MeanSemantics.COEFF_MEAN)
    peer = aggregate(payloads, shapes, cfg.distro, MeanSemantics.PEER_MEAN)
    assert coeff.contributing_peers == peer.contributing_peers == 3 and not coeff.rejected
    differ = sum(int((coeff.updates[n].sign() != peer.updates[n].sign()).sum()) for n in shapes)
    assert 0 < differ < sum(u.numel() for u in coeff.updates.values())
