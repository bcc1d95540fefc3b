"""One process per peer on torch.distributed, with the in-process simulator's numbers.

Each process holds one peer's replica and runs the simulator's own halves of a
round (`Network.send`, `Network.deliver`, `Network.record`), so for the same
seed and config the metrics equal `simulate`'s exactly, on CPU.

Exchange goes through torch.distributed's c10d TCPStore (the key-value store
that process groups rendezvous on), not a collective: an all-gather over a
fixed process group cannot complete once one member has died, whereas a
missing store key is just a payload that never arrived. Per round r, every
present peer p publishes `r/sent/p` (its loss, fault, byte counts, and the
payload bytes with their lengths); every present peer waits for the others'
keys, delivers to its own replica what arrived (in peer order, exactly as the
in-process loop), and publishes `r/recv/p` (contributing count, a digest of its
weights); the lowest present peer publishes the round's record. The launcher
(rank -1, the parent) hosts the store, writes metrics.jsonl and enforces the
timeouts: a peer that never joins, or a run that stops making progress, ends
with a clear error and every child process killed.

The fault plan is a pure function of the seed, so every process derives the
same one without communication. Churn: a rejoining peer loads the current
weights that the lowest present peer publishes (safetensors bytes).
"""
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist

from sim.checkpoint import checkpoint_config, keep_step, save_tensors
from sim.clock import WALL, Clock
from sim.config import RunConfig
from sim.distro import DistroState
from sim.errors import ConfigError, SimError
from sim.faults import FaultPlan, NetworkFaults, Sent
from sim.metrics import RunResult, count_churn, summary
from sim.align import prefix_dim
from sim.model import build_model, is_mlp_sliced, mlp_layer
from sim.run import CHECKPOINT, Network, check_every, evaluates, fault_plan, run_length, saves_checkpoint
from sim.tiers import layer_tiers, tier_width

JOIN_TIMEOUT_S = 120.0


def _pack(sent: Sent) -> bytes:
    """A Sent as bytes: a JSON line, then its payloads back to back (lengths in the JSON)."""
    head = {"peer": sent.peer, "loss": sent.loss, "faults": list(sent.faults), "withheld": sent.withheld,
            "bytes_sent": sent.bytes_sent, "outgoing": [len(d) for d in sent.outgoing],
            "late": [len(d) for d in sent.late], "delay_ms": sent.delay_ms, "fate": sent.fate}
    return json.dumps(head).encode() + b"\n" + b"".join(sent.outgoing + sent.late)


def _unpack(data: bytes) -> Sent:
    head, _, body = data.partition(b"\n")
    meta = json.loads(head)
    parts, offset = [], 0
    for length in meta["outgoing"] + meta["late"]:
        parts.append(body[offset:offset + length])
        offset += length
    n = len(meta["outgoing"])
    return Sent(meta["peer"], meta["loss"], tuple(meta["faults"]), meta["withheld"], meta["bytes_sent"], parts[:n],
                parts[n:], meta["delay_ms"], meta["fate"])


def _digest(model, network: Network) -> str:
    """A replica's weights on the elements every present replica holds, as `_replica_max_diff`
    compares them in one process: a peer back from a sliced checkpoint stores only its prefix,
    so every replica is hashed narrowed to the narrowest stored width of each layer (every
    process knows each peer's tiers and whether it came back sliced)."""
    full = network.config.model.intermediate_size
    narrowest = [min(tier_width(full, min(p.tiers)) if p.id in network.sliced else full for p in network.present())
                 ] * network.config.model.num_hidden_layers
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if is_mlp_sliced(name):
            tensor = tensor.narrow(prefix_dim(name), 0, narrowest[mlp_layer(name)])
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _get(store, key: str, timeout_s: float) -> bytes | None:
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistStoreError):
        return None
    return store.get(key)


def peer_process(rank: int, host: str, port: int, config: RunConfig, tiers, fractions, plan: FaultPlan, seed: int,
                 rounds: int, eval_every: int, wait_s: float, trouble: dict, saving: dict | None = None,
                 network_faults: NetworkFaults | None = None, start_round: int = 0) -> None:
    """One peer's process: join, then, round by round in step with the coordinator, run its
    send half, deliver what the coordinator says arrived to its own replica, and (when it is
    the lowest peer whose payload arrived) publish the round's record.
    `trouble` ({"crash": round, "slow": [rounds]}) makes this process misbehave: a slow peer
    sends only once the coordinator has closed the round without it, whatever the speed.
    `start_round` > 0: a process started for a peer back from churn (its old one was killed
    when it left): it catches up on the run's membership, then rejoins as the plan says."""
    torch.set_num_threads(1)
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    saving = saving or {}
    # network_faults: applied in this process's send path, as in-process
    network = Network(config, tiers, fractions, seed, device="cpu", only=rank, init_checkpoint=saving.get("init"),
                      network_faults=network_faults, scratch=saving.get("scratch"))
    me = network.peers[rank]
    if start_round:
        _catch_up(network, plan, store, start_round)
    store.set(_joined(rank, start_round), b"1")
    for round_ in range(start_round, rounds):
        go = json.loads(_get(store, f"go/{round_}", wait_s * 4 + JOIN_TIMEOUT_S) or b'{"stop": true}')
        if go.get("stop"):
            break
        network.away.update(go["dead"])
        _membership(network, plan, round_, store, me, set(go["dead"]))
        if rank in network.away:
            continue
        sent = network.send(me, round_, plan.on_payloads(round_).get(rank))
        if trouble.get("crash") == round_:
            os._exit(17)  # killed mid-round: trained, never sent
        if round_ in trouble.get("slow", ()):
            _get(store, f"{round_}/arrived", wait_s * 4 + JOIN_TIMEOUT_S)
        store.set(f"{round_}/sent/{rank}", _pack(sent))
        arrival = json.loads(_get(store, f"{round_}/arrived", wait_s * 4 + JOIN_TIMEOUT_S))
        everyone = [sent if p == rank else _unpack(store.get(f"{round_}/sent/{p}"))
                    for p in arrival["peers"]]
        # A payload past the deadline arrives with the next round, where it is stale.
        overdue = [d for r, p in arrival["overdue"] for d in _unpack(store.get(f"{r}/sent/{p}")).outgoing]
        arrived = network.carried + overdue + [d for s in everyone for d in s.outgoing]
        network.carried = [d for s in everyone for d in s.late]
        (received,) = network.deliver(round_, arrived, network.receivers())
        store.set(f"{round_}/recv/{rank}", json.dumps({"contributing": received.contributing_peers,
                                                       "digest": _digest(me.model, network)}).encode())
        # The reporter evaluates and hands over checkpoints, so it holds the full weights: the
        # lowest such peer whose payload arrived (a peer back from a sliced checkpoint holds a prefix).
        full = ([p for p in arrival["peers"] if p not in network.sliced]
                or [p.id for p in network.present() if p.id not in network.sliced])
        if arrival["peers"] and full and rank == full[0]:
            views = [json.loads(_get(store, f"{round_}/recv/{p}", wait_s) or b"null") for p in arrival["peers"]]
            views = [v for v in views if v is not None]
            # Replicas live in other processes: compared by digest, a disagreement reads NaN.
            same = len(views) == len(arrival["peers"]) and len({v["digest"] for v in views}) == 1
            record = count_churn(network.record(
                round_, everyone, received.rejected, [v["contributing"] for v in views], 0.0 if same else float("nan"),
                evaluates(round_, eval_every, rounds, arrival["last"])), plan.leaving(round_))
            if arrival["missing"]:
                record["missing"] = arrival["missing"]
            if saving.get("out") and saves_checkpoint(round_, saving.get("every"), rounds, arrival["last"]):
                # The coordinator holds no replica: the reporter hands it the weights to save.
                store.set(f"{round_}/checkpoint/config", json.dumps(checkpoint_config(me.model)).encode())
                store.set(f"{round_}/checkpoint", safetensors.torch.save(
                    {n: p.detach().contiguous() for n, p in me.model.named_parameters()}))
            store.set(f"{round_}/record", json.dumps(record, sort_keys=True).encode())


def _moments(data: bytes) -> dict:
    """AdamW's moments as the donor published them: {name: (m, v, t)}."""
    tensors, _, steps = data.rpartition(b"\n")
    loaded = safetensors.torch.load(tensors) if tensors else {}
    return {n: (loaded[f"{n}/m"], loaded[f"{n}/v"], t) for n, t in json.loads(steps).items()}


def _catch_up(network: Network, plan: FaultPlan, store, start_round: int) -> None:
    """What a restarted peer's process must know before it rejoins at `start_round`: every
    earlier round's membership (who left, who came back at which tiers, who is dead), the
    payloads due to arrive late at `start_round`, and the AdamW moments every replica shares
    (its donor's, published with the weights)."""
    for round_ in range(start_round):
        dead = set(json.loads(store.get(f"go/{round_}"))["dead"])
        network.away.update(dead)
        _membership(network, plan, round_, store, None, dead)
    arrived = json.loads(store.get(f"{start_round - 1}/arrived"))
    network.carried = [d for p in arrived["peers"] for d in _unpack(store.get(f"{start_round - 1}/sent/{p}")).late]


def _membership(network: Network, plan: FaultPlan, round_: int, store, me, dead: set) -> None:
    """The plan's churn for this round, applied identically in every process; a returning
    peer's own process takes the current weights from the lowest present peer holding the
    full weights (not one back from a sliced checkpoint: `Network.sliced`), then joins as
    `Network.rejoin` would, via the plan's checkpoint strategy."""
    for fault in plan.returning(round_):
        if fault.peer in dead:
            continue
        peer = network.peers[fault.peer]
        if fault.rejoin_tier is not None:
            peer.tiers = layer_tiers(fault.rejoin_tier, network.config.model.num_hidden_layers)
        peer.state = DistroState.fresh(network.config.distro)
        donor = min(p.id for p in network.present() if p.id not in network.sliced)
        key = f"{round_}/weights/{fault.peer}"
        if me is not None and me.id == donor:
            # Cloned: a model with tied embeddings holds one tensor under two names, which
            # safetensors refuses to write.
            store.set(key, safetensors.torch.save({n: t.detach().clone() for n, t in me.model.state_dict().items()}))
            store.set(f"{key}/adam", safetensors.torch.save(
                {f"{n}/{part}": t for n, (m, v, _) in network.adam.items() for part, t in (("m", m), ("v", v))})
                + b"\n" + json.dumps({n: steps for n, (_, _, steps) in network.adam.items()}).encode())
        sliced = fault.rejoin_from == "sliced-checkpoint" and min(peer.tiers) > 0
        if me is not None and me.id == fault.peer:   # the donor's weights, then the join's own path
            donated = build_model(network.config.model, 0, device="cpu")
            donated.load_state_dict(safetensors.torch.load(_get(store, key, JOIN_TIMEOUT_S)))
            # The moments every replica shares: this process's went stale while it was away (or
            # it is a new process), so the donor's, as the in-process network's one state.
            network.adam.clear()
            network.adam.update(_moments(_get(store, f"{key}/adam", JOIN_TIMEOUT_S)))
            me.model, me.helper_fraction = network._copy_of_current(fault.rejoin_from or "current", peer.tiers,
                                                                    me.helper_fraction, f"peer{me.id}", donated)
            store.set(_rejoined(me.id, round_), b"1")
        elif sliced:
            peer.helper_fraction = 0.0   # as its own process finds: a sliced checkpoint holds no suffix
        (network.sliced.add if sliced else network.sliced.discard)(fault.peer)
        network.away.discard(fault.peer)
    for fault in plan.leaving(round_):
        if fault.peer not in network.away:
            network.leave(fault.peer)


def simulate_distributed(config: RunConfig, tiers: Sequence, helper_fractions: Sequence[float] | None = None,
                         faults: FaultPlan | str | None = None, seed: int = 0, *, rounds: int | None = None,
                         out: str | Path | None = None, eval_every: int | None = None,
                         deadline_s: float | None = None, round_deadline_s: float | None = None,
                         on_round: Callable[[dict], None] | None = None, join_timeout_s: float = JOIN_TIMEOUT_S,
                         trouble: dict[int, dict] | None = None, clock: Clock = WALL,
                         init_checkpoint: str | Path | None = None, checkpoint_every: int | None = None,
                         max_shard_bytes: int | None = None, network_faults: NetworkFaults | None = None,
                         client_checkpoint_dir: str | Path | None = None, client_keep_steps: int = 3) -> RunResult:
    """`simulate` with every peer in its own process, on CPU: the same records. The
    coordinator (this process) waits up to `round_deadline_s` (default: the config's
    max_round_train_time) after a round's first payload for the others; a peer whose
    payload is not there is left out of that round ("missing" in the record; its payload,
    if it comes, is delivered next round as stale), and a peer whose process has died is
    left out for good. `deadline_s` ends the run at a round boundary, like
    --headless-exit-after-secs. `trouble` ({peer: {"crash": round} | {"slow": [rounds]} |
    {"never_join": True}}) makes peers misbehave, for tests of what only a
    process boundary shows. `clock` times the wait for every peer to join and `deadline_s`.
    Checkpoints (`init_checkpoint`, `checkpoint_every`, out/checkpoint) as `simulate` has them:
    the round's reporter hands the coordinator its weights to save.

    Under torchrun (RANK and WORLD_SIZE set), this process is rank 0, the coordinator:
    it hosts the store on MASTER_ADDR:MASTER_PORT and ranks 1..N run the peers (`run_peer`)."""
    if config.optimizer != "Distro":
        raise ConfigError(f"the distributed backend carries payloads between processes, and under optimizer "
                          f"{config.optimizer} peers send none: use --backend inprocess")
    rounds, eval_every = run_length(config, rounds, eval_every)
    check_every(checkpoint_every)
    # The joins' checkpoints live in a folder of the run's, removed after its processes are:
    # a process killed mid-join (churn, the end of the run) cannot clean up after itself.
    scratch = tempfile.TemporaryDirectory(prefix="matsim-run-")
    saving = {"init": init_checkpoint, "every": checkpoint_every, "out": out is not None, "scratch": scratch.name}
    probe = Network(config, tiers, helper_fractions, seed, device="cpu", only=-1)
    plan = fault_plan(faults, probe, rounds, seed)
    fractions = [p.helper_fraction for p in probe.peers]
    wait_s = round_deadline_s or config.max_round_train_time
    trouble = trouble or {}
    launched = torchrun_rank() is not None
    if launched:  # the peers are other torchrun ranks, maybe on other machines: liveness unknown here
        _check_world(len(probe.peers))
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=True,
                              wait_for_workers=False)
        workers = {}
    else:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        context = multiprocessing.get_context("spawn")

        def process(rank: int, start_round: int = 0):
            return context.Process(target=peer_process, daemon=True, name=f"matsim-peer-{rank}",
                                   args=(rank, "127.0.0.1", store.port, config, list(tiers), fractions, plan, seed,
                                         rounds, eval_every, wait_s, trouble.get(rank, {}), saving, network_faults,
                                         start_round))
        workers = {rank: process(rank) for rank in range(len(probe.peers))}

    def alive(peer: int) -> bool:
        return peer not in workers or workers[peer].is_alive()

    records, timings, dead, overdue, stopped_early = [], [], set(), [], False
    try:
        for rank, worker in workers.items():
            if not trouble.get(rank, {}).get("never_join"):
                worker.start()
        _await_joins(store, {p.id: _joined(p.id) for p in probe.peers}, workers, join_timeout_s, clock)
        start = clock.now()
        for round_ in range(rounds):
            tick = time.perf_counter()
            restarted = {}
            if not launched:   # churn as real clients churn: a leaving peer's process is killed, a new one returns
                for fault in plan.returning(round_):
                    if fault.peer not in dead and not workers[fault.peer].is_alive():
                        workers[fault.peer] = process(fault.peer, round_)
                        workers[fault.peer].start()
                        restarted[fault.peer] = _joined(fault.peer, round_)
                # The round starts once they are back, as a returning client joins at a round
                # boundary: a process still starting would read as a late payload, by wall clock.
                _await_joins(store, restarted, workers, join_timeout_s, clock)
            store.set(f"go/{round_}", json.dumps({"dead": sorted(dead)}).encode())
            if not launched:
                # A peer leaving this round may be the donor of one returning in it: its process is
                # killed once the newcomers hold their weights (it trains nothing this round).
                _await_joins(store, {p: _rejoined(p, round_) for p in restarted}, workers, join_timeout_s, clock)
                for fault in plan.leaving(round_):
                    if fault.peer not in dead and workers[fault.peer].is_alive():
                        workers[fault.peer].kill()
                        workers[fault.peer].join()
            _membership(probe, plan, round_, store, None, dead)  # membership only: it holds no replica
            probe.away.update(dead)
            present = [p.id for p in probe.present()]
            arrived = _collect(store, round_, present, alive, wait_s)
            missing = [p for p in present if p not in arrived]
            dead.update(p for p in missing if not alive(p))
            # Decided before the record, as simulate does, so the last round run is evaluated.
            stopped_early = (deadline_s is not None and clock.now() - start >= deadline_s
                             and round_ + 1 < rounds)
            # A payload missing from the last round arrives now if it is in the store by now; a
            # peer killed before it sent (churn) sent nothing, and nobody may wait for it.
            overdue = [[r, p] for r, p in overdue if store.check([f"{r}/sent/{p}"])]
            store.set(f"{round_}/arrived", json.dumps({"peers": arrived, "missing": missing, "overdue": overdue,
                                                       "last": stopped_early}).encode())
            overdue = [[round_, p] for p in missing if p not in dead]
            if not arrived:
                raise SimError(f"round {round_}: no peer's payload arrived within {wait_s * 10:g} s")
            records.append(json.loads(_await(store, f"{round_}/record", alive, len(probe.peers),
                                             time.perf_counter() + wait_s * 4)))
            if out and saves_checkpoint(round_, checkpoint_every, rounds, stopped_early):
                save_tensors(safetensors.torch.load(store.get(f"{round_}/checkpoint")),
                             json.loads(store.get(f"{round_}/checkpoint/config")), Path(out) / CHECKPOINT,
                             max_shard_bytes)
                if client_checkpoint_dir:
                    keep_step(Path(out) / CHECKPOINT, client_checkpoint_dir, round_ + 1, client_keep_steps)
            timings.append({"round": round_, "wall_s": time.perf_counter() - tick})
            if on_round:
                on_round(records[-1])
            if stopped_early:
                store.set(f"go/{round_ + 1}", json.dumps({"stop": True}).encode())
                break
        if launched:  # torchrun peers wait for the go of a round past the last: tell them to stop
            store.set(f"go/{len(records)}", json.dumps({"stop": True}).encode())
    finally:
        if not launched:   # peers still waiting for a round's go (a failed join, an error) stop now
            store.set(f"go/{len(records)}", json.dumps({"stop": True}).encode())
        _stop(workers)
        scratch.cleanup()
    result = RunResult(records, timings, probe.source.entropy_rate, stopped_early, {})
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        (out / "timing.jsonl").write_text("".join(json.dumps(t) + "\n" for t in timings))
        (out / "summary.json").write_text(json.dumps(summary(result), indent=2, sort_keys=True))
    return result


def torchrun_rank() -> int | None:
    """This process's rank when torchrun launched it, else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def _check_world(peers: int) -> None:
    world = int(os.environ["WORLD_SIZE"])
    if world != peers + 1:
        raise ConfigError(f"torchrun started {world} processes for {peers} clients: start one per client plus the "
                          f"coordinator (rank 0), i.e. {peers + 1} in all")


def run_peer(config: RunConfig, tiers: Sequence, helper_fractions: Sequence[float] | None = None,
             faults: FaultPlan | str | None = None, seed: int = 0, *, rounds: int | None = None,
             eval_every: int | None = None, round_deadline_s: float | None = None,
             init_checkpoint: str | Path | None = None, checkpoint_every: int | None = None,
             network_faults: NetworkFaults | None = None) -> None:
    """A torchrun rank r >= 1: peer r - 1 of the run the coordinator (rank 0) drives. It takes
    the same arguments as the coordinator, so it derives the same plan without asking (the
    testnet's coordinator always writes results, so checkpoints are always handed over)."""
    rounds, eval_every = run_length(config, rounds, eval_every)
    probe = Network(config, tiers, helper_fractions, seed, device="cpu", only=-1)
    _check_world(len(probe.peers))
    peer_process(torchrun_rank() - 1, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), config, list(tiers),
                 [p.helper_fraction for p in probe.peers], fault_plan(faults, probe, rounds, seed), seed, rounds,
                 eval_every, round_deadline_s or config.max_round_train_time, {},
                 {"init": init_checkpoint, "every": checkpoint_every, "out": True}, network_faults)


def _collect(store, round_: int, present: list[int], alive: Callable[[int], bool], wait_s: float) -> list[int]:
    """The present peers whose payload is in the store by the round's deadline, in peer
    order. The deadline runs from the first payload of the round, so a machine that is
    slow for everyone (a loaded CI runner, the first round's warm-up) delays the round
    instead of dropping every peer; waiting for that first payload is bounded too."""
    first_by = time.perf_counter() + wait_s * 10
    until, waiting = None, set(present)
    while waiting:
        now = time.perf_counter()
        arrived = {p for p in waiting if store.check([f"{round_}/sent/{p}"])}
        if arrived and until is None:
            until = now + wait_s
        waiting = {p for p in waiting - arrived if alive(p)}
        if not waiting or (until is not None and now >= until) or (until is None and now >= first_by):
            break
        time.sleep(0.002)
    return [p for p in present if store.check([f"{round_}/sent/{p}"])]


def _stop(workers: dict) -> None:
    """Every child ends: joined if it finished, killed otherwise. No process is left behind."""
    for worker in (w for w in workers.values() if w.pid is not None):
        worker.join(timeout=10)
        if worker.is_alive():
            worker.kill()
            worker.join()


def _joined(peer: int, start_round: int = 0) -> str:
    """The key a peer's process sets once it is ready: one per process a peer has had."""
    return f"joined/{peer}" + (f"/{start_round}" if start_round else "")


def _rejoined(peer: int, round_: int) -> str:
    """The key a returning peer's process sets once it holds its donor's weights."""
    return f"{round_}/rejoined/{peer}"


def _await_joins(store, keys: dict[int, str], workers: dict, timeout_s: float, clock: Clock) -> None:
    """Wait until every peer of `keys` ({peer: its process's `_joined` key}) has joined."""
    until, waiting = clock.now() + timeout_s, set(keys)
    while waiting:
        waiting = {p for p in waiting if not store.check([keys[p]])}
        for p in waiting:
            worker = workers.get(p)
            if worker is not None and worker.pid is not None and not worker.is_alive():
                raise SimError(f"peer {p}'s process exited (code {worker.exitcode}) before joining the run")
        if waiting and clock.now() > until:
            names = ", ".join(map(str, sorted(waiting)))
            raise SimError(f"peer{'s' if len(waiting) > 1 else ''} {names} did not join within {timeout_s:g} s: the "
                           f"run needs every peer's process to start and reach the store")
        clock.sleep(0.05)


def _await(store, key: str, alive: Callable[[int], bool], peers: int, until: float) -> bytes:
    while not store.check([key]):
        if not any(alive(p) for p in range(peers)):
            raise SimError(f"every peer process has exited before {key.split('/')[0]} rounds completed")
        if time.perf_counter() > until:
            raise SimError(f"the distributed run made no progress to {key!r} before its timeout")
        time.sleep(0.01)
    return store.get(key)
