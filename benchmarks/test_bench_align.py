"""align_prefix_grad on the chapter's gate shapes, against the bare torch op
that does the same data movement (F.pad to grow, narrow to shrink). The ratio
is the cost of validation and name matching on the aggregation hot path."""
import pytest
import torch
import torch.nn.functional as F

from sim.align import align_prefix_grad

NAME = "model.layers.0.mlp.gate_proj.weight"
LOCAL, FULL = torch.randn(512, 256), torch.randn(1024, 256)


@pytest.mark.benchmark(group="align expand [512,256]->[1024,256]")
def test_bench_expand_baseline_pad(benchmark):
    out = benchmark(F.pad, LOCAL, (0, 0, 0, 512))
    assert out.shape == (1024, 256)


@pytest.mark.benchmark(group="align expand [512,256]->[1024,256]")
def test_bench_expand_align_prefix_grad(benchmark):
    out = benchmark(align_prefix_grad, NAME, LOCAL, (1024, 256))
    assert torch.equal(out, F.pad(LOCAL, (0, 0, 0, 512)))


@pytest.mark.benchmark(group="align slice [1024,256]->[512,256]")
def test_bench_slice_baseline_narrow(benchmark):
    out = benchmark(FULL.narrow, 0, 0, 512)
    assert out.shape == (512, 256)


@pytest.mark.benchmark(group="align slice [1024,256]->[512,256]")
def test_bench_slice_align_prefix_grad(benchmark):
    out = benchmark(align_prefix_grad, NAME, FULL, (512, 256))
    assert torch.equal(out, FULL[:512])
