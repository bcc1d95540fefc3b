import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker (and the CLI subprocesses tests start): with
    # -n auto the workers already fill the cores, and OpenMP threads spinning on top of
    # each other made the suite ~10x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

from properties.profiles import register_profiles  # noqa: E402

PROFILE = register_profiles()


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE}"
