"""Harness overhead and scale of the simulator.

- Overhead: one simulated round (train, compress, encode, every receiver decoding,
  aggregating and applying, replica check) against the same peers' bare
  forward+backward+compress, in the same run (goal: at most 1.10x). "round+eval"
  adds the held-out evaluation, a forward over EVAL_SEQUENCES sequences that
  `simulate` runs every `eval_every` rounds (about 50 per run by default). The
  interleaved variant alternates bare peers and rounds in one test: the figure to
  trust on a host whose speed drifts between tests.
- Memory: peak RSS of 64 peers of test-nanogpt-small in shared-weights mode
  against 1 peer, each in a fresh process."""
import json
import statistics
import subprocess
import sys
import time

import pytest

from sim.config import load_config
from sim.peer import train_and_compress
from sim.run import Network

TIERS = [0, 1, 1]
ROUNDS = 30   # a ratio of medians near 1.1 needs more than a handful of samples to settle


def bare_peers(network, round_):
    """What the peers would do with no harness: forward, backward, DisTrO compress."""
    for peer in network.present():
        peer.model.set_tiers(peer.tiers)
        train_and_compress(peer.model, peer.state, network.tokens([peer], round_)[0], 1e-3, peer.id, round_)


@pytest.mark.parametrize("config", ["tiny", "test-nanogpt-small"])
@pytest.mark.parametrize("what", ["bare-baseline", "round", "round+eval"])
def test_bench_harness_overhead(benchmark, config, what):
    benchmark.group = f"harness overhead, {config}, tiers 0,1,1"
    network = Network(load_config(config), TIERS, seed=0, device="cpu", batching="off")   # the harness vs bare serial peers
    counter = iter(range(10**6))
    if what.startswith("round"):
        evaluate = what == "round+eval"
        record = benchmark.pedantic(lambda: network.round(next(counter), evaluate=evaluate), rounds=ROUNDS, warmup_rounds=3)
        assert record["contributing_peers"] == 3 and (record["eval_loss"] is not None) == evaluate
    else:
        benchmark.pedantic(lambda: bare_peers(network, next(counter)), rounds=ROUNDS, warmup_rounds=3)
        assert all(p.state.delta for p in network.peers)


@pytest.mark.parametrize("config", ["tiny", "test-nanogpt-small"])
def test_bench_harness_overhead_interleaved(benchmark, config):
    """The same ratio where the machine's speed drifts between tests (a shared host): bare
    peers and a round alternate, and the ratio is the median over pairs, each pair timed in
    the same few milliseconds. The benchmark's own time is a pair's."""
    benchmark.group = f"harness overhead, {config}, tiers 0,1,1, interleaved"
    network = Network(load_config(config), TIERS, seed=0, device="cpu", batching="off")   # the harness vs bare serial peers
    counter, ratios, records = iter(range(10**6)), [], []

    def pair():
        tick = time.perf_counter()
        bare_peers(network, next(counter))
        tock = time.perf_counter()
        records.append(network.round(next(counter), evaluate=False))
        ratios.append((time.perf_counter() - tock) / (tock - tick))

    benchmark.pedantic(pair, rounds=ROUNDS, warmup_rounds=3)
    timed = ratios[3:] or ratios   # under xdist the benchmark is off and runs once, untimed
    ratio = statistics.median(timed)
    benchmark.extra_info["round_over_bare"] = ratio
    print(f"\n{config}: round / bare peers = {ratio:.3f} (median of {len(timed)} interleaved pairs)")
    assert len(ratios) == (1 if benchmark.disabled else ROUNDS + 3) and all(r["contributing_peers"] == 3 for r in records)


PEAK = """
import json, sys
from sim.config import load_config
from sim.memory import peak_rss_bytes
from sim.run import Network
network = Network(load_config("test-nanogpt-small"), [0, 1] * (int(sys.argv[1]) // 2) or [0], seed=0,
                  shared_weights=True, device="cpu")
network.round(0)
print(json.dumps({"peers": len(network.peers), "peak_rss": peak_rss_bytes()}))
"""


def test_bench_memory_of_64_shared_weight_peers_vs_1(benchmark):
    def measure(n):
        out = subprocess.run([sys.executable, "-c", PEAK, str(n)], capture_output=True, text=True, check=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])

    peers = 4 if benchmark.disabled else 64   # run once as a test (xdist): the same code, a smoke size
    one, many = measure(1), benchmark.pedantic(measure, args=(peers,), rounds=1)
    benchmark.extra_info.update(peak_rss_1_peer=one["peak_rss"], peak_rss_64_peers=many["peak_rss"],
                                ratio=many["peak_rss"] / one["peak_rss"])
    assert one["peers"] == 1 and many["peers"] == peers
    print(f"\npeak RSS: 1 peer {one['peak_rss'] / 2**20:.0f} MiB, {peers} peers {many['peak_rss'] / 2**20:.0f} MiB "
          f"({many['peak_rss'] / one['peak_rss']:.2f}x)")


@pytest.mark.parametrize("backend", ["in-process-baseline", "distributed"])
def test_bench_rounds_per_second_of_4_processes_vs_in_process(benchmark, backend):
    """Rounds per second (median round wall time, process start-up excluded) of tiny with
    4 peers: one process per peer on torch.distributed's store vs the in-process loop."""
    from sim.distributed import simulate_distributed
    from sim.run import simulate
    benchmark.group = "rounds per second, tiny, 4 peers (0,1,1,2)"
    # Run once as a test (xdist): the same code at a smoke size, 2 processes for 2 rounds.
    rounds, tiers = (2, [0, 1]) if benchmark.disabled else (12, [0, 1, 1, 2])
    run = (lambda: simulate(load_config("tiny"), tiers, seed=0, rounds=rounds, device="cpu")) \
        if backend == "in-process-baseline" else \
        (lambda: simulate_distributed(load_config("tiny"), tiers, seed=0, rounds=rounds))
    result = benchmark.pedantic(run, rounds=1)
    walls = sorted(t["wall_s"] for t in result.timings[1:])  # round 0 warms up
    per_second = 1 / walls[len(walls) // 2]
    benchmark.extra_info["rounds_per_second"] = per_second
    print(f"\n{backend}: {per_second:.1f} rounds/s")
    assert len(result.records) == rounds
