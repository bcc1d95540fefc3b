"""What a run reports: a round's metrics line (metrics.jsonl), the run's result and its
summary.json. The convergence criteria read these and nothing else, so every field is
checked against the exact reference (properties/test_reference.py)."""
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class RunResult:
    records: list[dict]                   # one per round, as in metrics.jsonl
    timings: list[dict]                   # one per round, as in timing.jsonl
    loss_floor: float                     # entropy rate of the data: no model can beat it
    stopped_early: bool = False
    final_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def eval_rounds(self) -> list[int]:
        """Rounds whose record carries a held-out loss (every `eval_every`-th, and the last)."""
        return [r["round"] for r in self.records if r["eval_loss"] is not None]

    @property
    def eval_losses(self) -> list[float]:
        return [r["eval_loss"] for r in self.records if r["eval_loss"] is not None]

    @property
    def final_eval_loss(self) -> float:
        return self.records[-1]["eval_loss"]

    def rejected(self) -> Counter:
        return sum((Counter(r["rejected"]) for r in self.records), Counter())

    def faults(self) -> Counter:
        return sum((Counter(r["faults"]) for r in self.records), Counter())

    def non_finite_losses(self) -> int:
        """Peers' training losses that were NaN or infinite."""
        return sum(1 for r in self.records for p in r["peers"].values()
                   if p["loss"] is not None and not math.isfinite(p["loss"]))




def round_record(network, round_: int, sent: Sequence, rejected: Counter, contributing: Sequence[int],
                 replica_max_diff: float, evaluate: bool) -> dict:
    """The round's metrics line, from every sender's half (sim.faults.Sent) and the receivers'
    counts (rejections as the first receiver saw them; contributing peers per receiver)."""
    losses, assigned = {s.peer: s.loss for s in sent if s.loss is not None}, network.assignment(round_)
    rejected = Counter(rejected)
    rejected["non_finite"] += sum(s.withheld for s in sent)
    links = {str(s.peer): {"delay_ms": s.delay_ms, "fate": s.fate} for s in sent if s.fate is not None}
    return {**({"network": links} if links else {}),
        "round": round_, "lr": network.config.lr(round_),
        "loss": sum(losses.values()) / len(losses),
        "eval_loss": network.eval_loss() if evaluate else None,
        "peers": {str(p.id): {"tier": _tier_label(p.tiers), "helper": p.helper_fraction, "loss": losses.get(p.id),
                              "present": p.id not in network.away, "sequences": len(assigned.get(p.id, ()))}
                  for p in network.peers},
        "contributing_peers": contributing[0],
        "receivers_agree": len(set(contributing)) == 1,
        "replica_max_diff": replica_max_diff,
        "rejected": dict(sorted((k, v) for k, v in rejected.items() if v)),
        "faults": dict(sorted(Counter(kind for s in sent for kind in s.faults).items())),
        "bytes_sent": sum(s.bytes_sent for s in sent),
    }


def count_churn(record: dict, leaving: Sequence) -> dict:
    """Add the peers that left this round to the record's faults: churn acts on membership,
    not on a payload, so the round itself cannot count it."""
    if leaving:
        record["faults"] = dict(sorted({**record["faults"], "churn": len(leaving)}.items()))
    return record



def _tier_label(tiers: tuple[int, ...]):
    return tiers[0] if len(set(tiers)) == 1 else list(tiers)



def summary(result: RunResult) -> dict:
    losses = result.eval_losses
    return {
        "rounds": len(result.records),
        "stopped_early": result.stopped_early,
        "first_eval_loss": losses[0],
        "final_eval_loss": losses[-1],
        "final_train_loss": result.records[-1]["loss"],
        "loss_floor": result.loss_floor,
        "rejected": dict(result.rejected()),
        "faults": dict(result.faults()),
        "non_finite_losses": result.non_finite_losses(),
        "bytes_sent": sum(r["bytes_sent"] for r in result.records),
    }
