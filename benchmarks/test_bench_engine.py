"""Batched peers (sim/engine.py) against the serial loop, as ratios measured in the same run.

- A round's wall time, serial over batched ("on"), with peers at tiers 0,1,2 (three groups)
  or all at one tier (one group: where `auto`'s rule comes from, nanogpt-20m-run included). Serial and batched
  rounds alternate on two networks of the same peers, and the ratio is the median over
  pairs: each pair sees the same machine, on a host whose speed drifts between tests.
- Whole-run property examples per second: a run of the whole-run properties' size (8 peers
  of tiny, mixed tiers, 6 rounds), serial and batched ("auto").
- Peak RSS of a round of 64 peers of tiny and 16 of test-nanogpt-small, serial and batched,
  each in a fresh process."""
import dataclasses
import json
import statistics
import subprocess
import sys
import time

import pytest

from sim.config import load_config
from sim.run import Network, simulate

PAIRS = 8


def every_peer_trains(run, peers: int):
    """`run` with a global batch that gives each of `peers` the batch one client trains
    (Psyche splits the global batch over the peers present: at tiny's 4 sequences, 60 of 64
    peers would train nothing, and a ratio of rounds would measure the four that do)."""
    return run.replace(global_batch_size=peers * run.client_batch, global_batch_size_end=None)


@pytest.mark.parametrize("config, tiers", [
    ("tiny", "0,1,2 x4"), ("tiny", "0,1,2 x16"), ("tiny", "0,1,2 x64"),
    ("test-nanogpt-small", "0,1,2 x4"), ("test-nanogpt-small", "0,1,2 x16"),
    ("tiny", "1 x2"), ("tiny", "1 x3"), ("tiny", "1 x4"), ("test-nanogpt-small", "1 x2"), ("test-nanogpt-small", "1 x4"),
    ("nanogpt-20m-run", "1 x2"),   # where `auto` does not batch
])
def test_bench_batched_round_over_serial(benchmark, config, tiers):
    pattern, count = tiers.split(" x")
    cycle = [int(t) for t in pattern.split(",")]
    peers = [cycle[i % len(cycle)] for i in range(int(count))]
    benchmark.group = f"batched peers, {config}, {len(peers)} peers at tiers {pattern}"
    run = every_peer_trains(load_config(config), len(peers))
    if benchmark.disabled and run.seq_len > 64:   # run once as a test (xdist): the same code, a smoke size
        run = run.replace(seq_len=16, model=dataclasses.replace(run.model, num_hidden_layers=2))
    serial, batched = (Network(run, peers, seed=0, device="cpu", batching=b) for b in ("off", "on"))
    counter, ratios, records = iter(range(10**6)), [], []

    def pair():
        round_ = next(counter)
        tick = time.perf_counter()
        serial.round(round_, evaluate=False)
        tock = time.perf_counter()
        records.append(batched.round(round_, evaluate=False))
        ratios.append((tock - tick) / (time.perf_counter() - tock))

    pairs = 3 if run.seq_len > 64 else PAIRS   # 20m: a pair takes half a minute
    benchmark.pedantic(pair, rounds=pairs, warmup_rounds=1)
    timed = ratios[1:] or ratios   # under xdist the benchmark is off and runs once, untimed
    ratio = statistics.median(timed)
    benchmark.extra_info["serial_over_batched"] = ratio
    print(f"\n{config}, {len(peers)} peers at {pattern}: serial round / batched round = {ratio:.2f} "
          f"(median of {len(timed)} pairs)")
    assert len(ratios) == (1 if benchmark.disabled else pairs + 1)
    assert all(p["sequences"] > 0 for r in records for p in r["peers"].values()), "a peer trained nothing"


@pytest.mark.parametrize("batching", ["off", "auto"])
def test_bench_whole_run_examples_per_second(benchmark, batching):
    """One example of the whole-run properties' size, serial and batched where auto batches."""
    benchmark.group = "whole-run property examples per second (tiny, 8 peers, 6 rounds)"
    run = load_config("tiny")
    tiers = [0, 1, 1, 1, 1, 2, 2, 0]
    result = benchmark.pedantic(lambda: simulate(run, tiers, seed=0, rounds=6, device="cpu", batching=batching),
                                rounds=3 if not benchmark.disabled else 1, warmup_rounds=0)
    assert len(result.records) == 6


PEAK = """
import json, sys
from sim.config import load_config
from sim.memory import peak_rss_bytes
from sim.run import Network
peers = int(sys.argv[2])
run = load_config(sys.argv[1])
run = run.replace(global_batch_size=peers * run.client_batch, global_batch_size_end=None)   # every peer trains (every_peer_trains)
network = Network(run, [0, 1, 2] * (peers // 3) + [0] * (peers % 3), seed=0, device="cpu", batching=sys.argv[3])
record = network.round(0)
assert all(p["sequences"] > 0 for p in record["peers"].values()), "a peer trained nothing"
print(json.dumps({"peers": len(network.peers), "peak_rss": peak_rss_bytes()}))
"""


@pytest.mark.parametrize("config, count", [("tiny", 64), ("test-nanogpt-small", 16)])
def test_bench_peak_memory_of_a_batched_round_vs_serial(benchmark, config, count):
    benchmark.group = f"peak RSS of a round, {config}, {count} peers at tiers 0,1,2"
    peers = 4 if benchmark.disabled else count   # run once as a test (xdist): the same code, a smoke size

    def measure(batching):
        out = subprocess.run([sys.executable, "-c", PEAK, config, str(peers), batching], capture_output=True,
                             text=True, check=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])

    serial, batched = measure("off"), benchmark.pedantic(measure, args=("on",), rounds=1)
    benchmark.extra_info.update(serial=serial["peak_rss"], batched=batched["peak_rss"],
                                ratio=batched["peak_rss"] / serial["peak_rss"])
    print(f"\npeak RSS, {config}, {peers} peers: serial {serial['peak_rss'] / 2**20:.0f} MiB, batched "
          f"{batched['peak_rss'] / 2**20:.0f} MiB ({batched['peak_rss'] / serial['peak_rss']:.2f}x)")
    assert serial["peers"] == batched["peers"] == peers
