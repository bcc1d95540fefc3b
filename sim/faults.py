"""Seeded fault plans: what goes wrong, for whom, in which round.

Kinds (rates per peer and round, e.g. `drop=0.1,corrupt=0.05`):
- drop: the payload never arrives;
- late: it arrives after the round deadline, i.e. in the next round, and is rejected as stale;
- duplicate: it arrives twice; the second copy is rejected;
- corrupt: one byte is flipped on the way; the checksum rejects it;
- nan: the peer's gradient holds NaN/Inf. With 1-bit payloads the wire cannot carry a
  NaN, so the peer's own guard must withhold it; unquantized, the NaN is sent and the
  receivers' validation must reject it. Either way it is counted as non_finite;
- byzantine: the payload is sign-flipped (or, unquantized, scaled by 10): valid on the wire,
  accepted, and only visible in the fault counts;
- churn: the peer leaves for 1-3 rounds and rejoins with the current model: copied, from a
  full checkpoint, or from that checkpoint sliced to its tier (Network.join's `via`),
  possibly at another tier, with a fresh DisTrO state.
A plan drawn from rates holds at most one fault per peer and round, and never takes every
peer away (if it would, churns are spared, lowest-numbered peer first); every payload of a
round may be lost. A plan written out may give one peer two faults in a round when they act
at different stages (`STAGES`: its gradient, its payload, its bytes, its delivery), e.g. a
late corrupted payload or a byzantine duplicate.
"""
import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from sim.distro import Sparse
from sim.errors import ConfigError
from sim.wire import Payload, encode_payload

KINDS = ("drop", "late", "duplicate", "corrupt", "nan", "byzantine", "churn")
LOSING = {"drop", "late", "corrupt", "nan", "churn"}  # the payload of that round does not count
# Where a payload fault acts, in order: on the gradient, the payload, its bytes, its delivery.
STAGES = {"nan": 0, "byzantine": 1, "corrupt": 2, "drop": 3, "late": 3, "duplicate": 3}
JOIN_VIA = ("current", "checkpoint", "sliced-checkpoint")


@dataclass(frozen=True)
class Fault:
    round: int
    peer: int
    kind: str
    away: int = 0                 # churn: rounds away
    rejoin_from: str = ""         # churn: one of JOIN_VIA
    rejoin_tier: int | None = None  # churn: tier after rejoining (None: unchanged)
    byte: int = 0                 # corrupt: which byte (mod payload length); also byzantine's mode


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...] = ()
    rates: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        acting: dict[tuple, list[Fault]] = {}
        for f in self.faults:
            if f.kind not in KINDS:
                raise ConfigError(f"fault kind {f.kind!r} is unknown: valid kinds are {', '.join(KINDS)}")
            acting.setdefault((f.round, f.peer), []).append(f)
        for (round_, peer), faults in acting.items():
            stages = [STAGES.get(f.kind, -1) for f in faults]
            if len(set(stages)) < len(stages):
                raise ConfigError(f"peer {peer} has faults {[f.kind for f in faults]} in round {round_}: at most one "
                                  f"churn, and at most one fault for each stage of a payload (its gradient: nan; "
                                  f"the payload: byzantine; its bytes: corrupt; its delivery: drop, late, duplicate)")

    def away(self, round_: int) -> set[int]:
        """Peers absent in `round_` because of churn (they leave at the fault's round)."""
        return {f.peer for f in self.faults if f.kind == "churn" and f.round <= round_ < f.round + f.away}

    def on_payloads(self, round_: int) -> dict[int, tuple[Fault, ...]]:
        """{peer: its faults acting on what it sends in `round_`, in stage order} (churn acts on
        membership)."""
        acting: dict[int, list[Fault]] = {}
        for f in self.faults:
            if f.round == round_ and f.kind != "churn":
                acting.setdefault(f.peer, []).append(f)
        return {peer: tuple(sorted(faults, key=lambda f: STAGES[f.kind])) for peer, faults in acting.items()}

    def leaving(self, round_: int) -> list[Fault]:
        return [f for f in self.faults if f.kind == "churn" and f.round == round_]

    def returning(self, round_: int) -> list[Fault]:
        return [f for f in self.faults if f.kind == "churn" and f.round + f.away == round_]

    def counts(self) -> Counter:
        return Counter(f.kind for f in self.faults)


def kinds(faults) -> frozenset[str]:
    """The kinds of a peer's faults in a round: from None, one Fault, or several."""
    if faults is None:
        return frozenset()
    return frozenset(f.kind for f in ((faults,) if isinstance(faults, Fault) else faults))


def parse_fault_spec(text: str | None) -> dict[str, float]:
    """'drop=0.1,corrupt=0.05' -> {'drop': 0.1, 'corrupt': 0.05}; '' or 'none' -> {}."""
    if not text or text.strip().lower() == "none":
        return {}
    rates = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise ConfigError(f"fault kind {kind!r} is unknown: valid kinds are {', '.join(KINDS)} "
                              f"(e.g. --faults drop=0.1,corrupt=0.05)")
        try:
            rate = float(value)
        except ValueError:
            raise ConfigError(f"fault rate {value!r} for {kind} is not a number: expected kind=rate, rate in [0, 1]") from None
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"fault rate {rate} for {kind} is outside [0, 1]")
        rates[kind] = rate
    if sum(rates.values()) > 1.0:
        raise ConfigError(f"fault rates {rates} add up to {sum(rates.values()):.3g} > 1: at most one fault per "
                          f"peer and round")
    return rates


def _generator(seed: int) -> torch.Generator:
    digest = hashlib.sha256(repr(("faults", seed)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def plan_faults(rates: dict[str, float], num_peers: int, rounds: int, seed: int, max_tier: int = 0) -> FaultPlan:
    """Draw at most one fault per (round, peer) from `rates`, deterministically from `seed`."""
    gen = _generator(seed)
    kinds, cumulative, total = list(rates), [], 0.0
    for kind in kinds:
        total += rates[kind]
        cumulative.append(total)
    faults, narrow = [], set()   # narrow: back from a checkpoint sliced below tier 0, no suffix to pass on
    for round_ in range(rounds):
        for f in faults:
            if f.kind == "churn" and f.round + f.away == round_:
                (narrow.add if f.rejoin_from == "sliced-checkpoint" and f.rejoin_tier else narrow.discard)(f.peer)
        away = {f.peer for f in faults if f.kind == "churn" and f.round <= round_ < f.round + f.away}
        chosen = {}
        for peer in range(num_peers):
            u, extra = torch.rand(1, generator=gen).item(), torch.randint(0, 2**31, (4,), generator=gen).tolist()
            if peer in away:
                continue
            kind = next((k for k, c in zip(kinds, cumulative) if u < c), None)
            if kind is None:
                continue
            fault = Fault(round_, peer, kind, byte=extra[0])
            if kind == "churn":
                fault = Fault(round_, peer, kind, away=1 + extra[1] % 3,
                              rejoin_from=JOIN_VIA[extra[2] % len(JOIN_VIA)],
                              rejoin_tier=extra[3] % (max_tier + 1), byte=extra[0])
            chosen[peer] = fault
        # Spare churns (lowest peer first) until a peer holding the full weights stays: a round
        # needs a peer, and a newcomer a full replica to copy (Network.may_leave). Churns of
        # earlier rounds passed this same check, so one always does.
        while num_peers and not (set(range(num_peers)) - away - narrow
                                 - {p for p, f in chosen.items() if f.kind == "churn"}):
            del chosen[min(p for p, f in chosen.items() if f.kind == "churn")]
        faults.extend(chosen.values())
    return FaultPlan(tuple(faults), dict(rates))


# --- faults on the wire: what leaves a sender ---------------------------------------------

@dataclass
class Sent:
    """What one peer's send half produced in a round."""
    peer: int
    loss: float | None                                   # None: no sequences were assigned to it
    faults: tuple[str, ...] = ()                         # the kinds that acted on what it sent
    withheld: bool = False                               # the sender's NaN guard kept it back
    bytes_sent: int = 0
    outgoing: list[bytes] = field(default_factory=list)  # arrives this round
    late: list[bytes] = field(default_factory=list)      # arrives next round
    delay_ms: int | None = None                          # on the network (NetworkFaults), when it models one
    fate: str | None = None                              # on_time, late or lost on that network


@torch.inference_mode()  # no autograd in a sender's wire work: skip its bookkeeping per call
def send_through(peer: int, payload: Payload | None, loss: float | None, faults, distro) -> Sent:
    """What leaves a peer: its payload (None when its NaN guard withheld it) encoded, with its `faults` (None, a Fault, or several of different stages) acting on
    the payload, its bytes and its delivery, in that order."""
    acting = {f.kind: f for f in ((faults,) if isinstance(faults, Fault) else faults or ())}
    named = tuple(sorted(acting, key=STAGES.get))
    if payload is None:
        return Sent(peer, loss, named, withheld=True)
    if "nan" in acting:  # unquantized: the NaN goes on the wire for receivers to catch
        next(iter(payload.params.values())).values.view(-1)[0] = float("nan")
    if "byzantine" in acting:
        payload = byzantine(payload, scale=not distro.quantize_1bit and acting["byzantine"].byte % 2 == 1)
    data = encode_payload(payload, distro.compression_chunk)  # values at the run's dtype
    sent = Sent(peer, loss, named, bytes_sent=len(data))
    if "corrupt" in acting:
        flipped = bytearray(data)
        flipped[acting["corrupt"].byte % len(flipped)] ^= 0xFF
        data = bytes(flipped)
    if "late" in acting:
        sent.late = [data]
    elif "drop" not in acting:
        sent.outgoing = [data, data] if "duplicate" in acting else [data]
    return sent


def byzantine(payload: Payload, scale: bool) -> Payload:
    """Sign-flipped (or, unquantized, 10x scaled) copy, helper slabs too: well-formed, and wrong."""
    factor = 10.0 if scale else -1.0

    def skewed(sparses):
        return {n: Sparse(s.grid, s.indices, s.values * factor) for n, s in sparses.items()}
    return Payload(payload.peer, payload.round, payload.tiers, skewed(payload.params), payload.quantized,
                   payload.helper_neurons, skewed(payload.helper_params))


# --- the network's faults: Psyche's --fault-* flags ----------------------------------------

@dataclass(frozen=True)
class NetworkFaults:
    """Psyche's network fault injection (shared/network-fault-injection, the flags of its
    local testnet and client): every payload a client sends is delayed by a latency of
    `base_ms` +- `jitter_ms` (uniform, whole milliseconds, never below 0) plus its bytes over
    `bandwidth` bytes per second (whole milliseconds, as `bandwidth_delay` floors them), and
    lost with probability `packet_loss`: the message never arrives (the crate's
    `should_drop_packet` fails the send; nothing retransmits it). On the simulated clock a
    round's payloads leave when their peers have trained (compute is not on the clock) and
    must arrive within the round, `max_round_train_time + round_witness_time` (Psyche's
    RoundTrain and RoundWitness phases); one that arrives later arrives with the next round,
    where it is stale. Client i draws from seed + i, as Psyche's local testnet seeds its
    clients, and each round draws afresh from (seed + i, round), so a fate never depends on
    which backend or process computes it."""
    base_ms: int = 0
    jitter_ms: int = 0
    packet_loss: float = 0.0
    bandwidth: int | None = None
    seed: int = 0

    def arrival(self, client: int, round_: int, nbytes: int) -> tuple[int, bool]:
        """(delay in ms, lost) of one payload: the latency drawn first, then the loss, as the
        crate's `inject_latency` and `should_drop_packet` draw them."""
        rng = np.random.default_rng([self.seed + client, round_])
        jitter = int(rng.integers(0, 2 * self.jitter_ms + 1)) - self.jitter_ms if self.jitter_ms else 0
        delay = max(0, self.base_ms + jitter) + (nbytes * 1000 // self.bandwidth if self.bandwidth else 0)
        return delay, bool(self.packet_loss and rng.random() < self.packet_loss)


def parse_network_faults(latency: str | None, packet_loss: float | None, bandwidth: int | None,
                         seed: int | None, run_seed: int = 0) -> NetworkFaults | None:
    """The fault flags as Psyche reads them, refused in one line where Psyche would ignore a
    bad value with a warning: --fault-latency-ms "BASE" or "BASE-JITTER" (non-negative whole
    ms), --fault-packet-loss in [0, 1], --fault-bandwidth-limit bytes per second > 0. No flag:
    None. Psyche seeds an unseeded run from the wall clock; matsim from the run's --seed."""
    if seed is not None and seed < 0:
        raise ConfigError(f"--fault-seed {seed} is invalid: expected an integer >= 0")
    if latency is None and packet_loss is None and bandwidth is None:
        return None
    base = jitter = 0
    if latency is not None:
        parts = str(latency).split("-")
        if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
            raise ConfigError(f"--fault-latency-ms {latency!r} is invalid: expected BASE or BASE-JITTER in whole "
                              f"milliseconds, e.g. 50 or 50-20 (50 ms +- 20 ms)")
        base, jitter = int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    if packet_loss is not None and not 0.0 <= packet_loss <= 1.0:
        raise ConfigError(f"--fault-packet-loss {packet_loss} is invalid: expected a probability in [0, 1]")
    if bandwidth is not None and bandwidth < 1:
        raise ConfigError(f"--fault-bandwidth-limit {bandwidth} is invalid: expected bytes per second >= 1")
    return NetworkFaults(base, jitter, packet_loss or 0.0, bandwidth, run_seed if seed is None else seed)


def through_the_network(sent: Sent, faults: NetworkFaults, round_: int, deadline_ms: float) -> Sent:
    """`sent` as the network delivers it: each payload of this round delayed, lost, or past
    the deadline (then it arrives next round). Its delay and fate go in the record."""
    if not sent.outgoing:
        return sent
    delay, lost = faults.arrival(sent.peer, round_, len(sent.outgoing[0]))
    sent.delay_ms = delay
    if lost:
        sent.fate, sent.outgoing = "lost", []
    elif delay > deadline_ms:
        sent.fate, sent.late, sent.outgoing = "late", sent.late + sent.outgoing, []
    else:
        sent.fate = "on_time"
    return sent
