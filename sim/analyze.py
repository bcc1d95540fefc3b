"""Analysis of a results directory: per scenario its final loss, error and NaN
counts, each success criterion PASS/FAIL, and a PNG of the loss curves with
each scenario's oracle overlaid.

A scenario is a subdirectory with metrics.jsonl, summary.json and
scenario.json ({"name", "tiers", "kind", "oracle"}), as `matsim matrix` and
`matsim testnet start --out` write them.
"""
import json
import math
from pathlib import Path

from sim import oracle as criteria
from sim.errors import ConfigError
from sim.run import RunResult

# The chapter's matrix, then the helper-mode experiment (does helping with suffix neurons
# close 0,1,1's gap to the homogeneous run?): name, tiers, helper fractions, kind, oracle.
MATRIX = [
    ("homogeneous", "0,0,0", None, "baseline", None),
    ("heterogeneous_1to2", "0,1,1", None, "heterogeneous", "homogeneous"),
    ("heterogeneous_2to1", "0,0,1", None, "heterogeneous", "homogeneous"),
    ("extreme_1to3", "0,1,1,1", None, "extreme", "oracle_4"),
    ("oracle_4", "0,0,0,0", None, "baseline", None),
    ("helper_0.25", "0,1,1", "0,0.25,0.25", "heterogeneous", "homogeneous"),
    ("helper_0.5", "0,1,1", "0,0.5,0.5", "heterogeneous", "homogeneous"),
]


def load_result(directory: Path) -> RunResult:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    summary = json.loads((directory / "summary.json").read_text())
    return RunResult([json.loads(line) for line in lines], [], summary["loss_floor"], summary["stopped_early"])


def judge(kind: str, result: RunResult, oracle: RunResult | None, rounds: int) -> dict[str, bool]:
    """The chapter's criteria for one scenario kind."""
    complete = criteria.all_complete(result, rounds)
    if kind == "baseline":
        return {"loss decreases": criteria.loss_decreases(result), "no errors": criteria.no_errors(result),
                "all clients complete all rounds": complete}
    if kind == "heterogeneous":
        finite = all(map(math.isfinite, result.eval_losses))
        judged = {"no NaN/Inf": finite, "all clients complete all rounds": complete}
        if oracle is not None:
            judged[f"final loss within {criteria.TOLERANCE:.0%} of homogeneous"] = criteria.within_tolerance(result, oracle)
        return judged
    return {"completes without errors": complete and criteria.no_errors(result),
            "loss decreases": criteria.loss_decreases(result)}


def analyze(directory: str | Path) -> list[dict]:
    """One row per scenario found under `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"results directory {str(directory)!r} does not exist")
    scenarios = {}
    for meta in sorted(directory.glob("*/scenario.json")):
        info = json.loads(meta.read_text())
        scenarios[info["name"]] = (info, load_result(meta.parent))
    if not scenarios:
        raise ConfigError(f"no scenarios under {str(directory)!r}: expected subdirectories with scenario.json "
                          f"(run `matsim matrix` or `matsim testnet start --out DIR`)")
    rows = []
    for name, (info, result) in scenarios.items():
        oracle = scenarios.get(info.get("oracle"), (None, None))[1]
        judged = judge(info["kind"], result, oracle, info["rounds"])
        rows.append({
            "scenario": name, "tiers": info["tiers"], "helpers": info.get("helpers") or "0",
            "final_loss": result.final_eval_loss,
            "vs_oracle": criteria.relative_gap(result, oracle) if oracle else None,
            "errors": sum(result.rejected().values()), "nan": result.non_finite_losses(), "criteria": judged,
            "passed": all(judged.values()),
        })
    return rows


def plot(directory: str | Path, path: str | Path, scenarios: set[str] | None = None) -> None:
    """Loss curves of every scenario under `directory` (or only `scenarios`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    directory = Path(directory)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    floor = None
    for meta in sorted(directory.glob("*/scenario.json")):
        info = json.loads(meta.read_text())
        if scenarios is not None and info["name"] not in scenarios:
            continue
        result = load_result(meta.parent)
        floor = result.loss_floor
        style = "--" if info["kind"] == "baseline" else "-"
        ax.plot(result.eval_rounds, result.eval_losses, style, label=f"{info['name']} ({info['tiers']}"
                + (f"; helpers {info['helpers']})" if info.get("helpers") else ")"))
    if floor is not None:
        ax.axhline(floor, color="grey", lw=0.8, ls=":", label=f"entropy floor {floor:.2f}")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss of the full model (nats)")
    ax.set_title("Loss curves (dashed: homogeneous oracles)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
