#!/usr/bin/env python
"""Measured false-alarm and detection rates of the convergence criteria (sim/oracle.py).

On a config (the CI config of the convergence checks, ffn-small, by default), with the
chapter's heterogeneous scenario 0,1,1 and its oracle 0,0,0:
1. calibration on correct code, seeds 0 .. `--calibrate` - 1: the bands of the paired gap
   and of the oracle's gap to the floor (written to the config's calibration.json with
   --write), and the no-suffix baseline (every peer at tier 2) on the first `--baseline`;
2. false alarms on the same seeds, leave-one-out: each seed judged by the bands of all the
   others, as a new seed is judged by the calibration;
3. detection: each integration bug of tests/planted_bugs.py planted in both runs (the
   oracle runs the same code), on the next `--detect` seeds.
Every run is one process (spawned: a planted bug never outlives its run), `--jobs` at a
time; finished runs are kept in OUT/runs.jsonl and reused (`--fresh` to start over).

    .venv/bin/python -m scripts.power --calibrate 100 --detect 10 --write

--write also publishes the summary as docs/data/power.json, stamped with the commit that
ran (sim/provenance.py): run it from a clean checkout, since the spawned runs import the
code as it is on disk while they start.
"""
import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scripts import CHECKOUT as REPO
from sim import oracle as criteria
from sim.config import load_config
from sim.provenance import stamp

ORACLE, HETERO, BASELINE = "0,0,0", "0,1,1", "2,2,2"
PUBLISHED = REPO / "docs" / "data" / "power.json"


def one_run(job: dict) -> dict:
    """Run one scenario (in its own process) and return what the criteria read of it."""
    import torch
    torch.set_num_threads(1)
    from sim.run import simulate
    from sim.tiers import parse_client_tiers
    patch = None
    if job["bug"]:
        import pytest

        from tests.planted_bugs import plant
        patch = pytest.MonkeyPatch()
        plant(patch, job["bug"])
    config = load_config(job["config"])
    tick = time.perf_counter()
    try:
        result = simulate(config, parse_client_tiers(job["tiers"]), seed=job["seed"], rounds=job["rounds"], device="cpu")
    except Exception as err:   # a planted bug may crash the run: that is a detection too
        return {**job, "crashed": f"{type(err).__name__}: {err}"[:300], "wall_s": time.perf_counter() - tick}
    finally:
        if patch:
            patch.undo()
    return {**job, "crashed": None, "final": result.final_eval_loss, "first": result.eval_losses[0],
            "floor": result.loss_floor, "errors": sum(result.rejected().values()),
            "non_finite": result.non_finite_losses() + sum(not math.isfinite(x) for x in result.eval_losses),
            "complete": criteria.all_complete(result, job["rounds"]), "wall_s": time.perf_counter() - tick}


def key(job: dict) -> tuple:
    return job["config"], job["rounds"], job["tiers"], job["seed"], job["bug"] or ""


def run_all(jobs: list[dict], out: Path, workers: int, console: Console) -> dict:
    """Every job's result, from OUT/runs.jsonl where it is there already."""
    store = out / "runs.jsonl"
    done = {}
    if store.exists():
        for line in store.read_text().splitlines():
            record = json.loads(line)
            done[key(record)] = record
    todo = [job for job in jobs if key(job) not in done]
    console.print(f"{len(jobs)} runs: {len(jobs) - len(todo)} kept from {store}, {len(todo)} to run on {workers} processes")
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool, \
            open(store, "a") as sink:
        for i, record in enumerate(pool.map(one_run, todo), 1):
            done[key(record)] = record
            sink.write(json.dumps(record, sort_keys=True) + "\n")
            sink.flush()
            if i % 10 == 0 or i == len(todo):
                console.print(f"  {i}/{len(todo)} runs, {time.perf_counter() - start:.0f} s")
    return done


def calibrate(name: str, rounds: int, oracles: list[dict], heteros: list[dict]) -> criteria.Calibration:
    """The bands of correct runs: the oracles' gaps to the floor, the paired gaps."""
    learning = criteria.Band.of(o["final"] / o["floor"] - 1 for o in oracles)
    paired = criteria.Band.of(h["final"] / o["final"] - 1 for o, h in zip(oracles, heteros))
    return criteria.Calibration(name, rounds, ORACLE, learning, {HETERO: paired}, [o["seed"] for o in oracles])


BROKEN = ("TypeError", "NameError", "AttributeError", "ImportError")   # a planted bug that does not fit the code


def verdicts(oracle: dict, hetero: dict, cal: criteria.Calibration, rounds: int) -> dict[str, bool]:
    """Which criteria a (oracle, heterogeneous) pair of runs on one seed fails: True = fired.
    A run the bug crashed fails them all (a crash is as loud as a detection gets)."""
    for run in (oracle, hetero):
        if run["crashed"] and run["crashed"].startswith(BROKEN):
            raise SystemExit(f"planted bug {run['bug']} broke instead of failing ({run['crashed']}): fix it in "
                             f"tests/planted_bugs.py, delete its runs from runs.jsonl and run again")
    if oracle["crashed"] or hetero["crashed"]:
        return {"chapter": True, "paired gap": True, "learning": True, "any": True}
    finite = all(math.isfinite(r["final"]) for r in (oracle, hetero))
    chapter = not (finite and oracle["final"] < oracle["first"] and hetero["final"] < hetero["first"]
                   and oracle["errors"] == 0 and oracle["non_finite"] == 0 and hetero["non_finite"] == 0
                   and oracle["complete"] and hetero["complete"]
                   and abs(hetero["final"] / oracle["final"] - 1) <= criteria.TOLERANCE)
    paired = not finite or not cal.paired[HETERO].passes([hetero["final"] / oracle["final"] - 1])
    learning = not finite or not cal.learning.passes([oracle["final"] / oracle["floor"] - 1])
    return {"chapter": chapter, "paired gap": paired, "learning": learning, "any": chapter or paired or learning}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-path", default="ffn-small")
    parser.add_argument("--rounds", type=int, help="default: the config's total_steps")
    parser.add_argument("--calibrate", type=int, default=100, help="seeds of correct code (also judged leave-one-out)")
    parser.add_argument("--baseline", type=int, default=10, help="no-suffix baseline runs (first calibration seeds)")
    parser.add_argument("--detect", type=int, default=10, help="fresh seeds per planted bug")
    parser.add_argument("--bugs", help="comma-separated (default: the integration catalog)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="results/power")
    parser.add_argument("--write", action="store_true", help="write the calibration into the config's directory")
    parser.add_argument("--fresh", action="store_true", help="forget the runs kept in OUT/runs.jsonl")
    args = parser.parse_args(argv)
    from tests.planted_bugs import BUGS, INTEGRATION
    config = load_config(args.config_path)
    rounds = args.rounds or config.total_steps
    bugs = args.bugs.split(",") if args.bugs else list(INTEGRATION)
    unknown = [b for b in bugs if b not in BUGS]
    if unknown:
        parser.error(f"unknown bugs {unknown}: the catalog has {sorted(BUGS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        (out / "runs.jsonl").unlink(missing_ok=True)
    console = Console(width=160)
    provenance = stamp()   # before the runs: what they import is the checkout as it is now

    cal_seeds = list(range(args.calibrate))
    det_seeds = list(range(args.calibrate, args.calibrate + args.detect))
    job = lambda tiers, seed, bug=None: {"config": args.config_path, "rounds": rounds, "tiers": tiers, "seed": seed, "bug": bug,
                                         "commit": provenance["commit"], "dirty": provenance["dirty"]}
    jobs = [job(t, s) for s in cal_seeds for t in (ORACLE, HETERO)]
    jobs += [job(BASELINE, s) for s in cal_seeds[:args.baseline]]
    jobs += [job(t, s, bug) for bug in bugs for s in det_seeds for t in (ORACLE, HETERO)]   # none with --detect 0
    runs = run_all(jobs, out, args.jobs, console)
    get = lambda tiers, seed, bug=None: runs[key(job(tiers, seed, bug))]

    # 1. calibration
    cal = calibrate(config.name, rounds, [get(ORACLE, s) for s in cal_seeds], [get(HETERO, s) for s in cal_seeds])
    if args.write:
        console.print(f"wrote {cal.save(config.path)}")
    floor = get(ORACLE, 0)["floor"]
    finals = {t: [get(t, s)["final"] for s in cal_seeds[:args.baseline]] for t in (ORACLE, HETERO, BASELINE)}
    paired_base = [b - o for b, o in zip(finals[BASELINE], finals[ORACLE])]
    summary = {
        "config": config.name, "rounds": rounds, "floor": floor,
        "oracle_final": statistics.mean(get(ORACLE, s)["final"] for s in cal_seeds),
        "oracle_final_sd": statistics.stdev(get(ORACLE, s)["final"] for s in cal_seeds),
        "hetero_final": statistics.mean(get(HETERO, s)["final"] for s in cal_seeds),
        "hetero_final_sd": statistics.stdev(get(HETERO, s)["final"] for s in cal_seeds),
        "baseline_final": statistics.mean(finals[BASELINE]), "baseline_final_sd": statistics.stdev(finals[BASELINE]),
        "baseline_minus_oracle": statistics.mean(paired_base), "baseline_minus_oracle_sd": statistics.stdev(paired_base),
        "learning": cal.learning.__dict__, "paired": cal.paired[HETERO].__dict__,
        "learning_bound": cal.learning.bound(), "paired_bound": cal.paired[HETERO].bound(),
        "learning_tolerance": cal.learning.detectable(), "paired_tolerance": cal.paired[HETERO].detectable(),
        "seconds_per_run": statistics.mean(r["wall_s"] for r in runs.values()),
    }
    summary["baseline_sigmas_raw"] = summary["baseline_minus_oracle"] / summary["oracle_final_sd"]
    summary["baseline_sigmas_paired"] = summary["baseline_minus_oracle"] / summary["baseline_minus_oracle_sd"]

    # 2. false alarms (leave-one-out), 3. detection
    names = ("chapter", "paired gap", "learning", "any")
    alarms = [verdicts(get(ORACLE, s), get(HETERO, s), calibrate(config.name, rounds,
                       [get(ORACLE, t) for t in cal_seeds if t != s], [get(HETERO, t) for t in cal_seeds if t != s]), rounds)
              for s in cal_seeds]
    summary["false_alarms"] = {n: sum(v[n] for v in alarms) for n in names} | {"seeds": len(cal_seeds)}
    detection = {}
    for bug in bugs if det_seeds else []:
        pairs = [(get(ORACLE, s, bug), get(HETERO, s, bug)) for s in det_seeds]
        fired = [verdicts(o, h, cal, rounds) for o, h in pairs]
        ok = [(o, h) for o, h in pairs if not o["crashed"] and not h["crashed"]]
        effect = {"paired gap": statistics.mean(h["final"] / o["final"] - 1 for o, h in ok) if ok else math.inf,
                  "learning": statistics.mean(o["final"] / o["floor"] - 1 for o, _ in ok) if ok else math.inf}
        detection[bug] = {"rates": {n: sum(f[n] for f in fired) / len(fired) for n in names},
                          "effect": effect, "crashed": sum(bool(o["crashed"] or h["crashed"]) for o, h in pairs),
                          "past_tolerance": {
                              "paired gap": effect["paired gap"] - cal.paired[HETERO].mean > cal.paired[HETERO].detectable(),
                              "learning": effect["learning"] - cal.learning.mean > cal.learning.detectable()}}
    summary["detection"] = detection
    summary["seeds"] = {"calibration": [cal_seeds[0], cal_seeds[-1]], "detection": det_seeds[:1] + det_seeds[-1:]}
    summary["runs"], summary["cpu_seconds"] = len(jobs), sum(runs[key(j)]["wall_s"] for j in jobs)
    measured = {(runs[key(j)].get("commit"), runs[key(j)].get("dirty")) for j in jobs}
    if len(measured) > 1:
        console.print(f"[red]the runs come from several checkouts {sorted(map(str, measured))}: not published[/] "
                      f"(--fresh measures them all again)")
        args.write = False
    commit, dirty = measured.pop() if len(measured) == 1 else (None, None)
    summary["provenance"] = {**provenance, "commit": commit, "dirty": dirty}
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    (out / "power.json").write_text(text)
    if args.write:
        PUBLISHED.write_text(text)
        console.print(f"wrote {PUBLISHED.relative_to(REPO)}")
    report(console, summary, names)
    return 0


def report(console: Console, s: dict, names) -> None:
    console.print(f"[bold]{s['config']}[/], {s['rounds']} rounds, floor {s['floor']:.4f}; oracle 0,0,0 "
                  f"{s['oracle_final']:.4f} (sd {s['oracle_final_sd']:.4f}), 0,1,1 {s['hetero_final']:.4f}, no-suffix "
                  f"baseline 2,2,2 {s['baseline_final']:.4f}: {s['baseline_minus_oracle']:+.4f} = "
                  f"{s['baseline_sigmas_raw']:.1f} sd of the oracle, {s['baseline_sigmas_paired']:.1f} sd of the paired "
                  f"difference; {s['seconds_per_run']:.1f} s a run", highlight=False)
    console.print(f"bands: paired gap {s['paired']['mean']:+.4f} sd {s['paired']['sd']:.4f} (bound {s['paired_bound']:+.4f}, "
                  f"tolerance {s['paired_tolerance']:.4f}); learning {s['learning']['mean']:.4f} sd {s['learning']['sd']:.4f} "
                  f"(bound {s['learning_bound']:.4f}, tolerance {s['learning_tolerance']:.4f})", highlight=False)
    fa = s["false_alarms"]
    console.print(f"false alarms on correct code (leave-one-out over {fa['seeds']} seeds): "
                  + ", ".join(f"{n} {fa[n]}/{fa['seeds']}" for n in names), highlight=False)
    console.print(f"{s['runs']} runs, {s['cpu_seconds'] / 3600:.1f} CPU hours", highlight=False)
    table = Table("bug", "paired gap", "floor gap", *names, title="detection rate per criterion (planted in both runs)")
    for bug, d in s["detection"].items():
        mark = lambda c: "*" if d["past_tolerance"][c] else ""
        table.add_row(bug, f"{d['effect']['paired gap']:+.4f}{mark('paired gap')}", f"{d['effect']['learning']:.4f}{mark('learning')}",
                      *(f"{d['rates'][n]:.0%}" for n in names))
    console.print(table)
    console.print("* the bug's mean effect is past the criterion's tolerance (it must be caught 95% of the time)")


if __name__ == "__main__":
    sys.exit(main())
