"""The multi-process backend across a real network boundary: two network namespaces, each with
its own address on a veth pair between them, run the docs' two-host torchrun recipe (c10d
rendezvous and the run's store on the first host's veth address), and the run's metrics equal
the in-process simulator's. The namespaces hold nothing but loopback and their end of the
pair, so the only traffic between the hosts is on the link the test made; they are removed
afterwards, even on failure. Without root (or `ip netns`), it skips and says why."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sim.config import load_config
from sim.run import simulate

HANG_GUARD_S = 300   # a hang guard only: the run takes seconds
ROUNDS = 4


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces (ip netns)")
    tag = f"{os.getpid() % 100000}"
    hosts = [(f"mtA{tag}", f"vA{tag}", f"10.231.{os.getpid() % 250}.1"),
             (f"mtB{tag}", f"vB{tag}", f"10.231.{os.getpid() % 250}.2")]
    made = []
    try:
        for ns, _, _ in hosts:
            if ip("netns", "add", ns).returncode:
                pytest.skip(f"cannot make network namespaces here: {ip('netns', 'add', ns).stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])]
        for ns, dev, addr in hosts:
            steps += [("link", "set", dev, "netns", ns), ("-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
                      ("-n", ns, "link", "set", "lo", "up"), ("-n", ns, "link", "set", dev, "up")]
        for step in steps:
            done = ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield hosts
    finally:
        for ns in made:   # deleting a namespace deletes its end of the pair, and so the pair
            ip("netns", "del", ns)
        assert not any(ns in ip("netns", "list").stdout for ns in made)


def link_bytes(ns: str, dev: str) -> int:
    shown = json.loads(ip("-n", ns, "-s", "-j", "link", "show", dev).stdout)
    return shown[0]["stats64"]["tx"]["bytes"]


def test_the_two_host_recipe_across_two_namespaces_gives_the_in_process_metrics(two_hosts, tmp_path):
    (ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b) = two_hosts
    for ns, dev, _ in two_hosts:   # nothing but loopback and the test's own link
        links = ip("-n", ns, "-o", "link").stdout.splitlines()
        assert len(links) == 2 and any(f" {dev}@" in line for line in links), links
    repo = Path(__file__).resolve().parent.parent
    torchrun = str(Path(sys.executable).parent / "torchrun")
    recipe = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr_a}:29411",
              "-m", "sim", "testnet", "start", "--backend", "distributed", "--num-clients", "3", "--config-path", "tiny",
              "--client-matformer-tiers", "0,1,1", "--rounds", str(ROUNDS), "--out", str(tmp_path / "two-hosts")]
    before = link_bytes(ns_b, dev_b)
    hosts = [subprocess.Popen(["ip", "netns", "exec", ns, torchrun, "--local-addr", addr,
                               "--rdzv-conf", f"is_host={int(ns == ns_a)}", *recipe], cwd=repo,
                              env={**os.environ, "TMPDIR": str(tmp_path)},   # torchrun leaves its folders there
                              stdout=open(tmp_path / f"{ns}.log", "w"), stderr=subprocess.STDOUT)
             for ns, _, addr in two_hosts]
    try:
        codes = [host.wait(timeout=HANG_GUARD_S) for host in hosts]
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
                host.wait()
    logs = "".join((tmp_path / f"{ns}.log").read_text()[-1500:] for ns, _, _ in two_hosts)
    assert codes == [0, 0], logs
    assert link_bytes(ns_b, dev_b) > before + 10_000   # the second host's peers spoke over the veth
    here = simulate(load_config("tiny"), [0, 1, 1], seed=0, rounds=ROUNDS, device="cpu", batching="off")
    there = [json.loads(line) for line in (tmp_path / "two-hosts" / "metrics.jsonl").read_text().splitlines()]
    assert there == here.records
