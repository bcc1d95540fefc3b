"""The homogeneous oracle and the criteria a run is judged by.

The oracle is the same run with every peer at tier 0 and no faults. Losses are the full
model's loss on a fixed held-out batch (`eval_loss`), comparable across tier assignments.

The verification chapter's criteria: loss decreases; no errors (no rejected payload, no
non-finite loss); every present peer completes every round; a heterogeneous run's final
loss is within 15% of the homogeneous one.

The chapter's 15% cannot fail for most bugs, so two sharper criteria are calibrated on
correct code (scripts/power.py measures how often each fires, on correct code and per
planted bug):
- paired gap: the heterogeneous run against its oracle on the same seed (same init, same
  data order), r = L_het / L_oracle - 1. Over k seeds, the mean of r must stay under the
  one-sided (1 - ALPHA) prediction bound of the mean of k new seeds' r, from its mean and
  spread over the calibration seeds;
- learning: the oracle against the data's floor, g = L_oracle / floor - 1, with the same
  kind of bound. It sees what the paired gap cannot: a bug that slows every run alike.
Each fires on correct code with probability ALPHA, so the two together at most 2 ALPHA.
"""
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from sim.errors import ConfigError
from sim.provenance import stamp
from sim.metrics import RunResult
from sim.run import simulate

TOLERANCE = 0.15
ALPHA = 0.005          # per calibrated criterion: together they false-alarm at most 1%
CALIBRATION = "calibration.json"   # in a config's directory, written by scripts/power.py


def run_oracle(config, num_peers: int, seed: int = 0, **kwargs) -> RunResult:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("faults", "helper_fractions")}
    return simulate(config, [0] * num_peers, seed=seed, **kwargs)


def loss_decreases(result: RunResult) -> bool:
    return result.final_eval_loss < result.eval_losses[0]


def no_errors(result: RunResult) -> bool:
    finite = all(map(math.isfinite, result.eval_losses)) and result.non_finite_losses() == 0
    return finite and not result.rejected()


def all_complete(result: RunResult, rounds: int) -> bool:
    """Every peer dealt sequences in a round reported a loss in it, and the run did all rounds."""
    return len(result.records) == rounds and all(
        p["loss"] is not None for r in result.records for p in r["peers"].values() if p["sequences"])


def fault_cost(result: RunResult, clean: RunResult) -> float:
    """What a run's faults took, in rounds' worth of payloads: each round, the payloads the same
    seed's fault-free run counted and `result` did not, as a share of that round's; a byzantine
    payload twice (a good one lost, and a bad one applied); a churn once (even where the peers
    present carry its share of the batch, it changes who trains what, and at which tier). Under
    sign-SGD a round's step has one size however many payloads make it, so losing one payload
    of one is a whole round lost, and one of eight an eighth. A run of cost 0 is its fault-free run."""
    cost = 0.0
    for mine, theirs in zip(result.records, clean.records):
        expected = max(theirs["contributing_peers"], 1)
        lost = theirs["contributing_peers"] - mine["contributing_peers"]
        cost += (lost + 2 * mine["faults"].get("byzantine", 0) + mine["faults"].get("churn", 0)) / expected
    return cost


def within_tolerance(result: RunResult, oracle: RunResult, tolerance: float = TOLERANCE) -> bool:
    return abs(result.final_eval_loss - oracle.final_eval_loss) <= tolerance * oracle.final_eval_loss


def relative_gap(result: RunResult, oracle: RunResult) -> float:
    return result.final_eval_loss / oracle.final_eval_loss - 1


def floor_gap(oracle: RunResult) -> float:
    """How far the oracle ended above the data's floor, relative to it."""
    return oracle.final_eval_loss / oracle.loss_floor - 1


def suffix_share(result: float, oracle: float, baseline: float) -> float:
    """Share of the FFN suffix's benefit a run recovers: 1 at the oracle's final loss, 0 at
    the no-suffix baseline's (every peer at the narrow tier)."""
    return (baseline - result) / (baseline - oracle)


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (Cornish-Fisher expansion in 1/dof: under 0.1% off from 9 degrees of
    freedom, under 1.5% from 4)."""
    if dof < 1:
        raise ConfigError(f"a t quantile needs at least 1 degree of freedom, got {dof}: calibrate on 2+ seeds")
    z = statistics.NormalDist().inv_cdf(p)
    return (z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * dof ** 3))


@dataclass(frozen=True)
class Band:
    """A per-seed statistic on correct code: its mean and standard deviation over n seeds."""
    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values) -> "Band":
        values = list(values)
        if len(values) < 2:
            raise ConfigError(f"a band needs at least 2 calibration seeds, got {len(values)}")
        return cls(statistics.mean(values), statistics.stdev(values), len(values))

    def bound(self, k: int = 1, alpha: float = ALPHA) -> float:
        """Upper (1 - alpha) prediction bound for the mean of k new seeds."""
        return self.mean + t_quantile(1 - alpha, self.n - 1) * self.sd * math.sqrt(1 / k + 1 / self.n)

    def detectable(self, k: int = 1, alpha: float = ALPHA, power: float = 0.95) -> float:
        """The shift of the mean that k seeds detect with probability `power`: the criterion's
        tolerance. A bug moving the expected statistic past mean + this must be caught."""
        z = statistics.NormalDist().inv_cdf(power)
        return self.bound(k, alpha) - self.mean + z * self.sd / math.sqrt(k)

    def passes(self, values) -> bool:
        values = list(values)
        return statistics.mean(values) <= self.bound(len(values))


@dataclass(frozen=True)
class Calibration:
    """Bands of one config's runs (rounds, peers) on correct code, per heterogeneous scenario."""
    config: str
    rounds: int
    oracle: str                    # the calibrated oracle's tiers ("0,0,0": peers count)
    learning: Band                 # floor_gap of that oracle
    paired: dict[str, Band]        # scenario key (tiers; helpers) -> relative_gap against that oracle
    seeds: list[int]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CALIBRATION
        data = {**asdict(self), "learning": asdict(self.learning), "paired": {k: asdict(b) for k, b in self.paired.items()},
                "provenance": stamp()}
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Calibration | None":
        path = Path(directory) / CALIBRATION
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(data["config"], data["rounds"], data["oracle"], Band(**data["learning"]),
                       {k: Band(**b) for k, b in data["paired"].items()}, data["seeds"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: not a calibration file ({type(err).__name__}: {err}); rerun "
                              f"scripts/power.py --calibrate to write it again") from None


def scenario_key(tiers: str, helpers: str | None) -> str:
    """How a calibration names a heterogeneous scenario: its tiers, and its helper fractions if any."""
    return tiers if not helpers or set(helpers.split(",")) <= {"0", "0.0"} else f"{tiers}; helpers {helpers}"
