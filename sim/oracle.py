"""The homogeneous oracle and the verification chapter's success criteria.

The oracle is the same run with every peer at tier 0 and no faults. Criteria:
loss decreases; no errors (no rejected payload, no non-finite loss); every
present peer completes every round; a heterogeneous run's final loss is within
15% of the homogeneous one. Losses are the full model's loss on a fixed
held-out batch (`eval_loss`), comparable across tier assignments.
"""
import math

from sim.run import RunResult, simulate

TOLERANCE = 0.15


def run_oracle(config, num_peers: int, seed: int = 0, **kwargs) -> RunResult:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("faults", "helper_fractions")}
    return simulate(config, [0] * num_peers, seed=seed, **kwargs)


def loss_decreases(result: RunResult) -> bool:
    return result.final_eval_loss < result.eval_losses[0]


def no_errors(result: RunResult) -> bool:
    finite = all(map(math.isfinite, result.eval_losses)) and result.non_finite_losses() == 0
    return finite and not result.rejected()


def all_complete(result: RunResult, rounds: int) -> bool:
    """Every peer present in a round reported a loss in it, and the run did all rounds."""
    return len(result.records) == rounds and all(
        p["loss"] is not None for r in result.records for p in r["peers"].values() if p["present"])


def within_tolerance(result: RunResult, oracle: RunResult, tolerance: float = TOLERANCE) -> bool:
    return abs(result.final_eval_loss - oracle.final_eval_loss) <= tolerance * oracle.final_eval_loss


def relative_gap(result: RunResult, oracle: RunResult) -> float:
    return result.final_eval_loss / oracle.final_eval_loss - 1
