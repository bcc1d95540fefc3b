"""Analysis of a results directory: per scenario its final loss against the data's floor,
the homogeneous oracle and the no-suffix baseline, the share of the FFN suffix's benefit
it recovers, error and NaN counts, each criterion PASS/FAIL, and a PNG of the loss curves
with the oracle, the baseline and the floor.

A scenario is a subdirectory with metrics.jsonl, summary.json and scenario.json ({"name",
"tiers", "kind", "oracle", ...}), as `matsim matrix` and `matsim testnet start --out`
write them. Where the run's config has a calibration (sim/oracle.py, written by
scripts/power.py) for the same number of rounds, the calibrated criteria join the
chapter's: the oracle's gap to the floor, and each calibrated scenario's paired gap to it.
"""
import json
import math
from pathlib import Path

from rich.table import Table

from sim import oracle as criteria
from sim.errors import ConfigError
from sim.metrics import RunResult
from sim.provenance import stamp

# The chapter's matrix, the no-suffix baseline (how much the data needs the FFN suffix), then
# the helper-mode experiment: name, tiers, helper fractions, kind, oracle.
MATRIX = [
    ("homogeneous", "0,0,0", None, "baseline", None),
    ("no_suffix", "2,2,2", None, "no-suffix", "homogeneous"),
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


def calibration_for(info: dict) -> criteria.Calibration | None:
    """The calibration of the scenario's config, if there is one for its number of rounds."""
    path = info.get("config_path")
    calibration = criteria.Calibration.load(path) if path and Path(path).is_dir() else None
    return calibration if calibration is not None and calibration.rounds == info["rounds"] else None


def judge(info: dict, result: RunResult, oracle: RunResult | None, calibration: criteria.Calibration | None
          ) -> dict[str, bool]:
    """The chapter's criteria for one scenario kind, and the calibrated ones that apply."""
    kind, complete = info["kind"], criteria.all_complete(result, info["rounds"])
    if kind in ("baseline", "no-suffix"):
        judged = {"loss decreases": criteria.loss_decreases(result), "no errors": criteria.no_errors(result),
                  "all clients complete all rounds": complete}
        if kind == "baseline" and calibration is not None and info["tiers"] == calibration.oracle:
            judged["learns to its calibrated gap to the floor"] = calibration.learning.passes([criteria.floor_gap(result)])
        return judged
    if kind == "heterogeneous":
        finite = all(map(math.isfinite, result.eval_losses))
        judged = {"no NaN/Inf": finite, "all clients complete all rounds": complete}
        if oracle is not None:
            judged[f"final loss within {criteria.TOLERANCE:.0%} of homogeneous"] = criteria.within_tolerance(result, oracle)
            band = calibration.paired.get(criteria.scenario_key(info["tiers"], info.get("helpers"))) if calibration else None
            if band is not None:
                judged["paired gap within its calibrated bound"] = finite and band.passes([criteria.relative_gap(result, oracle)])
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
    baseline = next((result for info, result in scenarios.values() if info["kind"] == "no-suffix"), None)
    order = [name for name, *_ in MATRIX]
    rows = []
    for name, (info, result) in sorted(scenarios.items(), key=lambda item: (order.index(item[0]) if item[0] in order
                                                                            else len(order), item[0])):
        oracle = scenarios.get(info.get("oracle"), (None, None))[1]
        reference = oracle if oracle is not None else result if info["kind"] == "baseline" else None
        judged = judge(info, result, oracle, calibration_for(info))
        share = None
        if reference is not None and baseline is not None and baseline.final_eval_loss != reference.final_eval_loss:
            share = criteria.suffix_share(result.final_eval_loss, reference.final_eval_loss, baseline.final_eval_loss)
        rows.append({
            "scenario": name, "tiers": info["tiers"], "helpers": info.get("helpers") or "0", "kind": info["kind"],
            "modes": info.get("modes", DEFAULT_MODES),
            "final_loss": result.final_eval_loss, "floor": result.loss_floor,
            "oracle": reference.final_eval_loss if reference is not None else None,
            "no_suffix": baseline.final_eval_loss if baseline is not None else None,
            "vs_oracle": criteria.relative_gap(result, oracle) if oracle else None,
            "vs_floor": result.final_eval_loss / result.loss_floor - 1,
            "suffix_share": share,
            "errors": sum(result.rejected().values()), "nan": result.non_finite_losses(), "criteria": judged,
            "passed": all(judged.values()),
        })
    return rows


SEPARATION = 0.01   # how much worse than its oracle the no-suffix baseline must end for the matrix to have power


def powerless(rows: list[dict]) -> list[str]:
    """Why no criterion of this matrix can fail on its data, if so: a check that cannot fail
    is not a check. A no-suffix baseline ending within SEPARATION of its oracle means the
    data never needed the FFN suffix, so no bug on the FFN side can move a loss."""
    return [f"the no-suffix baseline ends {row['final_loss'] / row['oracle'] - 1:+.1%} from the oracle (under "
            f"+{SEPARATION:.0%}): on this run's data the FFN suffix made no difference, so no criterion here can "
            f"see a bug on the FFN side"
            for row in rows if row["kind"] == "no-suffix" and row["oracle"] is not None
            and row["final_loss"] < row["oracle"] * (1 + SEPARATION)]


# What a scenario.json from before runs named their modes ran with.
DEFAULT_MODES = {"mean_semantics": "coeff", "apply_rule": "sign", "weight_decay": 0.0, "zero_blocks": "absent"}


def modes_label(modes: dict) -> str:
    """e.g. "coeff, sign", "peer, sgd, wd 0.1, zero blocks sent", or "AdamW (local)" where
    nothing is exchanged."""
    if "optimizer" in modes:
        return f"{modes['optimizer']} (local)"
    wd, zeros = modes.get("weight_decay", 0.0), modes.get("zero_blocks", "absent")
    return (f"{modes['mean_semantics']}, {modes['apply_rule']}" + (f", wd {wd:g}" if wd else "")
            + (f", zero blocks {zeros}" if zeros != "absent" else ""))


STYLES = {"baseline": ("--", None), "no-suffix": (":", "black")}


def plot(directory: str | Path, path: str | Path, scenarios: set[str] | None = None) -> None:
    """Loss curves of every scenario under `directory` (or only `scenarios`): oracles dashed,
    the no-suffix baseline dotted black, the data's floor grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    directory = Path(directory)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    floor = None
    for meta in sorted(directory.glob("*/scenario.json")):
        info = json.loads(meta.read_text())
        if scenarios is not None and info["name"] not in scenarios:
            continue
        result = load_result(meta.parent)
        floor = result.loss_floor
        style, color = STYLES.get(info["kind"], ("-", None))
        ax.plot(result.eval_rounds, result.eval_losses, style, color=color, label=f"{info['name']} ({info['tiers']}"
                + (f"; helpers {info['helpers']})" if info.get("helpers") else ")"))
    if floor is not None:
        ax.axhline(floor, color="grey", lw=0.8, ls="-.", label=f"entropy floor {floor:.3f}")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss of the full model (nats)")
    ax.set_yscale("log")   # the last nats above the floor are where tiers differ
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.set_title("Loss curves (dashed: homogeneous oracles; dotted: no-suffix baseline)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: str | Path, out) -> int:
    """`matsim analyze`: the matrix table, each scenario's criteria, the loss curves and
    analysis.json (stamped with the commit) in `results`; 0 when every scenario passes."""
    rows = analyze(results)
    table = Table("scenario", "tiers", "helpers", "modes", "final loss", "floor", "oracle", "no-suffix", "vs oracle",
                  "suffix share", "errors", "NaN", "criteria", "verdict", title=f"MatFormer scenario matrix: {results}")
    number = lambda value, spec: "-" if value is None else format(value, spec)
    for row in rows:
        table.add_row(row["scenario"], row["tiers"], row["helpers"], modes_label(row["modes"]),
                      f"{row['final_loss']:.4f}", f"{row['floor']:.4f}",
                      number(row["oracle"], ".4f"), number(row["no_suffix"], ".4f"), number(row["vs_oracle"], "+.1%"),
                      number(row["suffix_share"], ".0%"), str(row["errors"]), str(row["nan"]),
                      f"{sum(row['criteria'].values())}/{len(row['criteria'])}",
                      "[green]PASS[/]" if row["passed"] else "[red]FAIL[/]")
    out.print(table)
    for row in rows:
        out.print(f"{row['scenario']}: " + "; ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in row["criteria"].items()),
                  highlight=False)
    png = Path(results) / "loss_curves.png"
    plot(results, png)
    helped = {row["scenario"] for row in rows if row["helpers"] != "0"}
    if helped:  # the helper-mode experiment on its own: 0,1,1 with and without helpers, and its oracle
        same = {row["scenario"] for row in rows if row["tiers"] in {r["tiers"] for r in rows if r["scenario"] in helped}}
        plot(results, Path(results) / "helper_mode.png", same | {"homogeneous"})
    (Path(results) / "analysis.json").write_text(json.dumps({**stamp(), "rows": rows}, indent=2))
    for warning in powerless(rows):
        out.print(f"warning: {warning}", highlight=False)
    verdict = all(row["passed"] for row in rows)
    out.print(f"verdict: {'PASS' if verdict else 'FAIL'} ({sum(r['passed'] for r in rows)}/{len(rows)} scenarios); "
              f"loss curves in {png}", highlight=False)
    return 0 if verdict else 1
