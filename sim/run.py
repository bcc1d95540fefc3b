"""The round loop: peers train, compress and send; faults act; every receiver
aggregates what arrived and applies it; metrics go to JSONL.

Data flows one way: config -> peers -> payloads (wire) -> faults -> aggregate ->
apply -> metrics. metrics.jsonl is deterministic (same seed, same config, CPU:
byte-identical); wall times go to timing.jsonl beside it.
"""
import copy
import json
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sim.aggregate import ApplyRule, MeanSemantics, apply_update, mean_semantics, receive_decoded
from sim.align import align_prefix_grad
from sim.checkpoint import export_tiers, keep_step, load_checkpoint, save_checkpoint
from sim.config import RunConfig
from sim.sources import remote_data_error
from sim.assignment import assign, round_seed
from sim.data import held_out, held_out_count, make_source, sequences
from sim.engine import check_batching, train_group, train_peers
from sim.distro import DistroState
from sim.errors import ConfigError
from sim.faults import (JOIN_VIA, FaultPlan, NetworkFaults, Sent, parse_fault_spec, plan_faults, send_through,
                        through_the_network)
from sim.metrics import RunResult, count_churn, round_record, summary
from sim.helper import helper_indices
from sim.model import build_model, default_device, parameters_by_name
from sim.peer import Peer, micro_batches, train_locally
from sim.tiers import layer_tiers, layer_widths
from sim.wire import VALUE_DTYPES, Payload, decode_payload

CHECKPOINT = "checkpoint"   # a run's checkpoint, in its results directory
EVAL_POINTS = 50   # default evaluations per run: a curve's worth, at a few % of the run's time


def validate_assignment(config: RunConfig, tiers: Sequence, helper_fractions: Sequence[float] | None):
    if not tiers:
        raise ConfigError("no peers: give at least one tier, e.g. --client-matformer-tiers 0,1,1")
    layers = config.model.num_hidden_layers
    per_peer = [layer_tiers(t, layers) for t in tiers]
    for t in per_peer:
        layer_widths(config.model.intermediate_size, t, layers)
    fractions = list(helper_fractions) if helper_fractions is not None else [0.0] * len(tiers)
    if len(fractions) != len(tiers):
        raise ConfigError(f"got {len(fractions)} helper fractions for {len(tiers)} peers: give one per peer")
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"helper fraction {f} is outside [0, 1]")
    return per_peer, fractions


class Network:
    """The peers of a run and everything they hold between rounds. `simulate` drives it
    from a fault plan; the whole-run state machine drives it rule by rule."""

    def __init__(self, config: RunConfig, tiers: Sequence, helper_fractions: Sequence[float] | None = None,
                 seed: int = 0, *, semantics: MeanSemantics | None = None, shared_weights: bool = False,
                 apply_rule: ApplyRule | None = None, weight_decay: float | None = None, device=None,
                 only: int | None = None, dtype: torch.dtype = torch.float32, batching: str = "auto",
                 init_checkpoint: str | Path | None = None, network_faults: NetworkFaults | None = None,
                 scratch: str | Path | None = None):
        per_peer, fractions = validate_assignment(config, tiers, helper_fractions)
        self.batching = check_batching(batching)
        self.network_faults = network_faults   # Psyche's --fault-* flags: every payload's delay and fate
        if dtype not in VALUE_DTYPES:
            raise ConfigError(f"dtype {dtype} is unsupported: valid are {', '.join(map(str, VALUE_DTYPES))}")
        # The receivers' modes: the config's ([matsim], the testnet flags) unless given here.
        self.config, self.seed, self.semantics = config, seed, semantics or mean_semantics(config.mean_semantics)
        self.apply_rule = apply_rule or ApplyRule(config.apply_rule)
        self.weight_decay = config.distro.weight_decay if weight_decay is None else weight_decay
        self.dtype = dtype
        self.adam: dict[str, tuple] = {}   # ApplyRule.ADAMW's moments, one state for every replica (apply_update)
        self.device = torch.device(device or default_device())
        if config.data is None:
            raise remote_data_error(config)
        self.source = make_source(config.data, config.model.vocab_size, seed, config.markov)
        # A source with its own seed (one task for every run) has one held-out batch for every run too:
        # runs of different seeds are then compared on the same tokens.
        task = seed if config.markov.seed is None else config.markov.seed
        self.held_out = held_out(self.source, task, held_out_count(config.global_batch_size),
                                 config.seq_len + 1).to(self.device)
        self._assigned: tuple[tuple, dict[int, range]] | None = None   # ((round, trainers), assignment)
        if shared_weights and config.optimizer != "Distro":
            raise ConfigError(f"shared-weights mode needs the Distro optimizer: under {config.optimizer} every "
                              f"client steps its own replica and nothing is exchanged")
        self.local_optimizers: dict[int, torch.optim.Optimizer] = {}   # AdamW runs: each client's own
        self.init_checkpoint = init_checkpoint
        self.shared = self._initial_model(0, 0.0)[0] if shared_weights else None
        # `only`: this process holds that peer's replica alone (sim/distributed.py; -1: none).
        self.peers = [self._new_peer(i, t, *((None, f) if shared_weights or only not in (None, i)
                                             else self._initial_model(t, f)))
                      for i, (t, f) in enumerate(zip(per_peer, fractions))]
        if init_checkpoint is not None and only is None and self.shared is None \
                and not any(_holds_full(p.model) for p in self.peers):
            raise ConfigError(f"init checkpoint {str(init_checkpoint)!r} is a sliced export: a run needs one peer "
                              f"holding the full weights; start from the full checkpoint")
        self.away: set[int] = set()
        self.sliced: set[int] = set()    # peers back from a checkpoint sliced below tier 0: no suffix to donate
        self.carried: list[bytes] = []   # late payloads: they arrive next round
        self.aggregates: list = []       # each receiver's Aggregate of the last round (the exact reference reads them)
        self.scratch = scratch   # where a join's checkpoint lives while it loads (None: the system's temp folder)

    def _new_peer(self, peer_id, tiers, model, fraction) -> Peer:
        return Peer(peer_id, tuple(tiers), fraction, DistroState.fresh(self.config.distro), model)

    def _initial_model(self, tiers, helper_fraction: float):
        """(a peer's starting replica at `tiers`, the helper fraction it can serve): a fresh init
        from the run's seed, or the run's init checkpoint loaded at the peer's widest tier with
        the auto strategy (a sliced export holds no suffix: helper mode is then auto-disabled,
        and a tier wider than it stores is an error)."""
        if self.init_checkpoint is None:
            return build_model(self.config.model, tiers, seed=self.seed, device=self.device,
                               dtype=self.dtype), helper_fraction
        widest = min(tiers) if isinstance(tiers, (tuple, list)) else tiers
        model, info = load_checkpoint(self.init_checkpoint, widest, "auto", helper_fraction, device=self.device,
                                      expected=self.config.model, dtype=self.dtype)
        return model.set_tiers(tiers), helper_fraction if info.helper_mode else 0.0

    def helpers(self, peer: Peer, round_: int) -> dict[int, torch.Tensor]:
        """The suffix neurons `peer` trains this round, per layer (none at fraction 0 or tier 0)."""
        if peer.helper_fraction == 0:
            return {}
        full = self.config.model.intermediate_size
        widths = layer_widths(full, peer.tiers, self.config.model.num_hidden_layers)
        return {layer: helper_indices(self.seed, round_, layer, width, full, peer.helper_fraction,
                                      self.config.helper_rotation_interval) for layer, width in enumerate(widths)}

    def assignment(self, round_: int) -> dict[int, range]:
        """{peer: the data indices it trains} in `round_`: Psyche's split of the round's global
        batch over the peers present (sim/assignment.py). Peers assigned nothing are absent."""
        trainers = tuple(p.id for p in self.present())
        if self._assigned is None or self._assigned[0] != (round_, trainers):
            index, total = self.config.data_schedule(round_)
            self._assigned = (round_, trainers), assign(trainers, total, index, round_seed(self.seed, round_))
        return self._assigned[1]

    def present(self) -> list[Peer]:
        return [p for p in self.peers if p.id not in self.away]

    def receivers(self) -> list[dict[str, torch.Tensor]]:
        """Every replica this process holds, as its parameters by name."""
        models = [self.shared] if self.shared is not None else [p.model for p in self.present() if p.model is not None]
        return [parameters_by_name(model) for model in models]

    # --- membership -------------------------------------------------------

    def may_leave(self, peer_id: int) -> bool:
        """A round needs one present peer, and the network one present replica of the full
        weights: peers from sliced checkpoints hold no suffix to hand on to a wider newcomer."""
        others = [p for p in self.present() if p.id != peer_id]
        # A peer whose replica lives in another process (model None) holds the full weights
        # unless it came back from a sliced checkpoint.
        return bool(others) and (self.shared is not None or any(
            (p.model is None and p.id not in self.sliced) or (p.model is not None and _holds_full(p.model))
            for p in others))

    def leave(self, peer_id: int) -> None:
        if not self.may_leave(peer_id):
            raise ConfigError(f"peer {peer_id} cannot leave: it is the last present peer, or the last one "
                              f"holding the full weights (the others joined from sliced checkpoints)")
        self.away.add(peer_id)

    def rejoin(self, peer_id: int, via: str = "current", tier: int | None = None) -> None:
        """Back with the current model (see `join` for `via`), at `tier` if given, with a
        fresh DisTrO state."""
        peer = self.peers[peer_id]
        if tier is not None:
            peer.tiers = layer_tiers(tier, self.config.model.num_hidden_layers)
            validate_assignment(self.config, [peer.tiers], None)
        peer.state = DistroState.fresh(self.config.distro)
        self.local_optimizers.pop(peer_id, None)
        if self.shared is None:  # copy before counting it present: it must not be its own donor
            peer.model, peer.helper_fraction = self._copy_of_current(via, peer.tiers, peer.helper_fraction,
                                                                     f"peer{peer_id}")
        (self.sliced.add if via == "sliced-checkpoint" and min(peer.tiers) > 0 else self.sliced.discard)(peer_id)
        self.away.discard(peer_id)

    def join(self, tiers, via: str = "current", helper_fraction: float = 0.0) -> int:
        """A new peer with the current model: copied in memory ("current"), from a full
        checkpoint a present peer writes ("checkpoint"), or from that checkpoint exported
        at the new peer's tier ("sliced-checkpoint": it then holds no suffix, and helper
        mode is auto-disabled with the reason logged)."""
        per_peer, fractions = validate_assignment(self.config, [tiers], [helper_fraction])
        model, fraction = None, fractions[0]
        if self.shared is None:
            model, fraction = self._copy_of_current(via, per_peer[0], fraction, f"peer{len(self.peers)}")
        self.peers.append(self._new_peer(len(self.peers), per_peer[0], model, fraction))
        return self.peers[-1].id

    def _copy_of_current(self, via: str, tiers, helper_fraction: float, tag: str, donor=None):
        """(model, the helper fraction it can serve) for a peer arriving at `tiers`, copied from
        `donor` (default: a present full replica of this process)."""
        if via not in JOIN_VIA:
            raise ConfigError(f"join via {via!r} is unknown: valid are {', '.join(JOIN_VIA)}")
        # The donor must be present now (a returning peer is as stale as the one it would help),
        # and hold the full weights (`may_leave` keeps one present).
        donor = self._full_replica() if donor is None else donor
        if via == "current":
            return copy.deepcopy(donor).set_tiers(tiers), helper_fraction
        # A folder for each join, gone once loaded: the auto rule would take a tier export an
        # earlier sliced join of this peer left beside a shared path, with that round's weights.
        with tempfile.TemporaryDirectory(prefix=f"matsim-{tag}-", dir=self.scratch) as folder:
            path = save_checkpoint(donor, Path(folder) / tag)
            if via == "sliced-checkpoint" and min(tiers) > 0:  # at the widest layer it runs; auto finds <path>-tier<t>
                export_tiers(path, [min(tiers)])
            model, info = load_checkpoint(path, min(tiers), "auto", helper_fraction, device=self.device, dtype=self.dtype)
        return model.set_tiers(tiers), helper_fraction if info.helper_mode else 0.0

    def _full_replica(self):
        """A present full-weights replica held by this process (never one living in another)."""
        return self.shared if self.shared is not None else next(
            p.model for p in self.present() if p.model is not None and _holds_full(p.model))

    def checkpoint(self, path: str | Path, max_shard_bytes: int | None = None) -> Path:
        return save_checkpoint(self._full_replica(), path, max_shard_bytes)

    def restore(self, path: str | Path) -> None:
        """Every replica loads the checkpoint; DisTrO states and AdamW moments restart (they
        belong to the old timeline)."""
        self.local_optimizers.clear()
        self.adam.clear()
        for peer in self.peers:
            peer.state = DistroState.fresh(self.config.distro)
            if self.shared is None:
                peer.model, _ = load_checkpoint(path, max(peer.tiers), "auto", device=self.device, dtype=self.dtype)
        if self.shared is not None:
            self.shared, _ = load_checkpoint(path, 0, "auto", device=self.device, dtype=self.dtype)
        self.carried = []

    # --- one round --------------------------------------------------------

    def round(self, round_: int, faults: dict | None = None, evaluate: bool = True) -> dict:
        """Every present peer with sequences assigned trains, compresses and sends; `faults`
        ({peer: Fault}) act on the payloads; every receiver aggregates what arrived and
        applies it. With `evaluate`, the record's eval_loss is the full model's held-out
        loss, else None."""
        faults, assigned = faults or {}, self.assignment(round_)
        trainers = [p for p in self.present() if p.id in assigned]
        if self.config.optimizer != "Distro":
            return self.local_round(round_, trainers, evaluate)
        # Every peer trains (peers of one shape batched, sim/engine.py), then every payload is
        # encoded: the same bytes as peer by peer, but the encoder's code stays warm after the
        # first payload (on a small model, caches gone cold over each forward/backward cost more
        # than the encoding itself).
        trained = train_peers(self, trainers, round_, faults, self.batching)
        sent = [self.post(peer, payload, loss, faults.get(peer.id)) for peer, (payload, loss) in zip(trainers, trained)]
        arrived = self.carried + [data for s in sent for data in s.outgoing]
        self.carried = [data for s in sent for data in s.late]
        receivers = self.receivers()
        received = self.aggregates = self.deliver(round_, arrived, receivers)
        return self.record(round_, sent, received[0].rejected, [r.contributing_peers for r in received],
                           _replica_max_diff(receivers), evaluate)

    def local_round(self, round_: int, peers: Sequence[Peer], evaluate: bool) -> dict:
        """A round under Psyche's AdamW or Dummy optimizer, where its trainer produces no DisTrO
        results: every client steps its own AdamW on its own gradient (Dummy: no step at all),
        nothing is sent, and the replicas drift apart (replica_max_diff measures by how much)."""
        sent = []
        for peer in peers:
            model = peer.model.set_tiers(peer.tiers).set_helpers(self.helpers(peer, round_))
            optimizer = None
            if self.config.optimizer == "AdamW":
                if peer.id not in self.local_optimizers:   # built once: its moments live across rounds
                    adamw = self.config.adamw
                    self.local_optimizers[peer.id] = torch.optim.AdamW(
                        model.parameters(), betas=adamw.betas, eps=adamw.eps, weight_decay=adamw.weight_decay)
                optimizer = self.local_optimizers[peer.id]
            loss = train_locally(model, optimizer, self.tokens([peer], round_)[0], self.config.lr(round_),
                                 self.config.adamw.clip_grad_norm, self.config.micro_batch_size)
            sent.append(Sent(peer.id, loss))
        receivers = self.receivers()
        self.aggregates = []
        return self.record(round_, sent, Counter(), [0] * len(receivers), _replica_max_diff(receivers), evaluate)

    def tokens(self, peers: Sequence[Peer], round_: int) -> torch.Tensor:
        """The sequences each of `peers` (of one batch size) trains in `round_`, [peers, batch,
        seq_len + 1]: the data indices its assignment gives it."""
        assigned = self.assignment(round_)
        indices = [i for p in peers for i in assigned[p.id]]
        batch = sequences(self.source, self.seed, indices, self.config.seq_len + 1)
        return batch.view(len(peers), -1, batch.shape[-1]).to(self.device)

    def send(self, peer: Peer, round_: int, fault=None) -> "Sent":
        """One peer's half of a round: train, compress, encode, and let `fault` act on what
        leaves it. A peer assigned no sequences this round trains and sends nothing."""
        if peer.id not in self.assignment(round_):
            return Sent(peer.id, None)
        return self.post(peer, *self.train(peer, round_, fault), fault)

    def train(self, peer: Peer, round_: int, fault=None) -> tuple[Payload | None, float]:
        """Train `peer` alone at its tiers (and helper neurons) on its sequences and compress:
        (payload, loss); no payload when its NaN guard withholds it (the nan fault's poison)."""
        return train_group(self, [peer], round_, {peer.id: fault} if fault else {}, batched=False)[0]

    def post(self, peer: Peer, payload: Payload | None, loss: float, faults=None) -> Sent:
        """What leaves a peer: its payload encoded, with its `faults` acting on it (sim/faults.py)."""
        sent = send_through(peer.id, payload, loss, faults, self.config.distro)
        if self.network_faults is None:
            return sent
        deadline_ms = 1000 * (self.config.max_round_train_time + self.config.round_witness_time)
        return through_the_network(sent, self.network_faults, payload.round if payload else 0, deadline_ms)

    @torch.inference_mode()
    def deliver(self, round_: int, arrived: Sequence[bytes], receivers: Sequence[dict[str, torch.Tensor]]) -> list:
        """Every receiver's half (`receivers` as `receivers()` gives them): decode what arrived,
        aggregate, apply. Decoding is a pure function of the bytes and aggregation of (payloads,
        receiver shapes), so each is done once per round and per distinct shape, then applied to
        every replica of that shape in one pass. Returns each receiver's Aggregate."""
        cfg, distro = self.config.model, self.config.distro
        lr = self.config.lr(round_)
        decoded = [decode_payload(data, cfg, distro, self.dtype) for data in arrived]
        aggregates, replicas, results = {}, {}, []
        for params in receivers:
            key = tuple((name, p.shape) for name, p in params.items())
            if key not in aggregates:
                aggregates[key] = receive_decoded(decoded, dict(key), distro, self.semantics, round_=round_)
            replicas.setdefault(key, []).append(params)
            results.append(aggregates[key])
        if self.apply_rule is ApplyRule.ADAMW:   # one history of aggregates: the moments step once, widest first
            widest = max(replicas, key=lambda key: sum(math.prod(shape) for _, shape in key))
            apply_update([r for same in replicas.values() for r in same], aggregates[widest].updates, lr,
                         self.apply_rule, self.weight_decay, adam_state=self.adam)
            return results
        for key, same_shapes in replicas.items():
            apply_update(same_shapes, aggregates[key].updates, lr, self.apply_rule, self.weight_decay)
        return results

    def record(self, round_: int, sent: Sequence[Sent], rejected: Counter, contributing: Sequence[int],
               replica_max_diff: float, evaluate: bool) -> dict:
        """The round's metrics line (sim/metrics.py)."""
        return round_record(self, round_, sent, rejected, contributing, replica_max_diff, evaluate)
    def eval_loss(self) -> float:
        """Loss of the full (tier-0) model on the fixed held-out batch, the mean over all its
        tokens: what the network learned. The one cost `eval_every` amortizes. In pieces of the
        micro-batch size, as a client puts its batch through: the logits of a whole global
        batch at once may not fit (64 x 2048 tokens of a 50k vocabulary are 26 GB)."""
        model = self._full_replica()
        tiers, tokens = model.layer_tiers, self.held_out[:, 1:].numel()
        model.set_tiers(model.stored_tiers)
        with torch.no_grad():   # each piece's mean weighs by its share of the tokens: pieces may be unequal
            loss = sum(model(piece[:, :-1], piece[:, 1:])[1] * (piece[:, 1:].numel() / tokens)
                       for piece in micro_batches(self.held_out, self.config.micro_batch_size))
        model.set_tiers(tiers)
        return loss.item()

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self._full_replica().state_dict().items()}


def simulate(config: RunConfig, tiers: Sequence, helper_fractions: Sequence[float] | None = None,
             faults: FaultPlan | str | None = None, seed: int = 0, *, rounds: int | None = None,
             out: str | Path | None = None, semantics: MeanSemantics | None = None,
             shared_weights: bool = False, apply_rule: ApplyRule | None = None, weight_decay: float | None = None,
             device=None, deadline_s: float | None = None, eval_every: int | None = None,
             on_round: Callable[[dict], None] | None = None, dtype: torch.dtype = torch.float32,
             batching: str = "auto", init_checkpoint: str | Path | None = None, checkpoint_every: int | None = None,
             max_shard_bytes: int | None = None, network_faults: NetworkFaults | None = None,
             client_checkpoint_dir: str | Path | None = None, client_keep_steps: int = 3) -> RunResult:
    """Run `rounds` (default: the config's total_steps) rounds of heterogeneous training
    under a fault plan (a FaultPlan, or a spec such as "drop=0.1,churn=0.05") and, with
    `network_faults`, Psyche's network faults on every payload (sim/faults.py).

    The held-out loss is measured on round 0, every `eval_every`-th round and the last
    round run (default: about EVAL_POINTS points per run). With `out`, the full model is saved
    to out/checkpoint every `checkpoint_every` rounds and after the last round run (atomic;
    sharded past `max_shard_bytes`); `init_checkpoint` starts every peer from a checkpoint."""
    rounds, eval_every = run_length(config, rounds, eval_every)
    network = Network(config, tiers, helper_fractions, seed, semantics=semantics, shared_weights=shared_weights,
                      apply_rule=apply_rule, weight_decay=weight_decay, device=device, dtype=dtype, batching=batching,
                      init_checkpoint=init_checkpoint, network_faults=network_faults)
    check_every(checkpoint_every)
    plan = fault_plan(faults, network, rounds, seed)
    out = Path(out) if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        metrics_file, timing_file = open(out / "metrics.jsonl", "w"), open(out / "timing.jsonl", "w")
    records, timings, start, stopped_early = [], [], time.perf_counter(), False
    try:
        for round_ in range(rounds):
            tick = time.perf_counter()
            record = play_round(network, plan, round_)
            stopped_early = (deadline_s is not None and time.perf_counter() - start >= deadline_s
                             and round_ + 1 < rounds)
            if evaluates(round_, eval_every, rounds, stopped_early):
                record["eval_loss"] = network.eval_loss()
            records.append(record)
            timings.append({"round": round_, "wall_s": time.perf_counter() - tick})
            if out:
                metrics_file.write(json.dumps(record, sort_keys=True) + "\n")
                timing_file.write(json.dumps(timings[-1]) + "\n")
                metrics_file.flush()
            if out and saves_checkpoint(round_, checkpoint_every, rounds, stopped_early):
                network.checkpoint(out / CHECKPOINT, max_shard_bytes)
                if client_checkpoint_dir:
                    keep_step(out / CHECKPOINT, client_checkpoint_dir, round_ + 1, client_keep_steps)
            if on_round:
                on_round(record)
            if stopped_early:
                break
    finally:
        if out:
            metrics_file.close()
            timing_file.close()
    result = RunResult(records, timings, network.source.entropy_rate, stopped_early, network.weights())
    if out:
        (out / "summary.json").write_text(json.dumps(summary(result), indent=2, sort_keys=True))
    return result


def play_round(network: Network, plan: FaultPlan, round_: int, evaluate: bool = False) -> dict:
    """Round `round_` of a planned run: peers back from churn rejoin, leavers leave, and the
    round runs under the plan's payload faults. Returns its record, churn counted."""
    for fault in plan.returning(round_):
        network.rejoin(fault.peer, fault.rejoin_from, fault.rejoin_tier)
    leaving = plan.leaving(round_)
    for fault in leaving:
        network.leave(fault.peer)
    return count_churn(network.round(round_, plan.on_payloads(round_), evaluate=evaluate), leaving)


def run_length(config: RunConfig, rounds: int | None, eval_every: int | None) -> tuple[int, int]:
    """(rounds, eval_every), validated: the config's total_steps and about EVAL_POINTS
    evaluations per run unless given."""
    rounds = config.total_steps if rounds is None else rounds
    if rounds < 1:
        raise ConfigError(f"rounds {rounds} is invalid: expected an integer >= 1")
    eval_every = max(1, math.ceil(rounds / EVAL_POINTS)) if eval_every is None else eval_every
    if eval_every < 1:
        raise ConfigError(f"eval_every {eval_every} is invalid: expected an integer >= 1")
    return rounds, eval_every


def saves_checkpoint(round_: int, every: int | None, rounds: int, last: bool = False) -> bool:
    """Whether a run writes its checkpoint after round `round_`: every `every` rounds, and
    after the last round run (the run's end, or the one a deadline made last)."""
    return (every is not None and (round_ + 1) % every == 0) or round_ + 1 == rounds or last


def check_every(every: int | None) -> None:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"checkpoint every {every!r} rounds is invalid: expected an integer >= 1")


def evaluates(round_: int, eval_every: int, rounds: int, last: bool = False) -> bool:
    """Whether a round's record carries the held-out loss: round 0, every eval_every-th,
    the last of the run, and the one a deadline made last."""
    return round_ % eval_every == 0 or round_ + 1 == rounds or last


def fault_plan(faults: FaultPlan | str | None, network: Network, rounds: int, seed: int) -> FaultPlan:
    """A FaultPlan as given, or drawn from a spec ("drop=0.1,churn=0.05") for this network."""
    if isinstance(faults, FaultPlan):
        return faults
    spec = parse_fault_spec(faults)
    on_payloads = sorted(kind for kind, rate in spec.items() if rate and kind != "churn")
    if on_payloads and network.config.optimizer != "Distro":
        raise ConfigError(f"faults {', '.join(on_payloads)} act on payloads, and under optimizer "
                          f"{network.config.optimizer} peers send none: only churn applies")
    return plan_faults(spec, len(network.peers), rounds, seed,
                       max(max(p.tiers) for p in network.peers))


@torch.inference_mode()
def _replica_max_diff(replicas: Sequence[dict[str, torch.Tensor]]) -> float:
    """Largest difference between any replica (parameters by name) and the first, over
    every element they share."""
    first = replicas[0]
    mine, theirs = [], []
    for other in replicas[1:]:
        for name, param in other.items():
            a = first[name]
            if a.shape != param.shape:
                narrower = min(a.shape, param.shape, key=lambda shape: shape.numel())
                a, param = (align_prefix_grad(name, t, narrower) for t in (a, param))
            mine.append(a)
            theirs.append(param)
    differ = [(a, b) for a, b in zip(mine, theirs) if not torch.equal(a, b)]  # the usual case: none
    if not differ:
        return 0.0
    return torch.stack([(a - b).abs_().amax() for a, b in differ]).max().item()  # one sync, not one per tensor


def _holds_full(model) -> bool:
    return all(width == model.cfg.intermediate_size for width in model.stored_widths)


