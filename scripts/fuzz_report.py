"""What a fuzzing run did, per property: whether the sweep's random examples ran (and
passed), and what HypoFuzz's campaigns left in the example database: examples run, behaviors
(branches and events) and fingerprints reached, time fuzzed, and failures found
(scripts/fuzz.sh writes it to results/fuzz/report.json after a run, with the commit).

    .venv/bin/python -m scripts.fuzz_report [--out results/fuzz] [pytest selection]
"""
import argparse
import json
from pathlib import Path
from xml.etree import ElementTree

from scripts import CHECKOUT as REPO
from sim.provenance import stamp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "results" / "fuzz"))
    parser.add_argument("--seconds", type=int, help="the run's budget, recorded with the report")
    parser.add_argument("selection", nargs="*", default=["properties/"])
    args = parser.parse_args()
    from hypofuzz.collection import collect_tests
    from hypofuzz.database import FailureState, HypofuzzDatabase
    from hypothesis import settings
    from rich.console import Console
    from rich.table import Table

    targets = collect_tests(args.selection).fuzz_targets
    database = HypofuzzDatabase(settings().database)
    swept = sweep_outcomes(Path(args.out) / "sweep.xml")
    rows = []
    for target in targets:
        key = target.database_key
        # each worker saves its own reports: the latest of each, summed over the workers
        latest = {}
        for report in database.reports.fetch(key):
            if report.worker_uuid not in latest or report.elapsed_time > latest[report.worker_uuid].elapsed_time:
                latest[report.worker_uuid] = report
        reports = list(latest.values())
        rows.append({
            "test": target.nodeid,
            "examples": sum(sum(r.status_counts.values()) for r in reports),
            "behaviors": max((r.behaviors for r in reports), default=0),
            "fingerprints": max((r.fingerprints for r in reports), default=0),
            "seconds": round(sum(r.elapsed_time for r in reports), 1),
            "failures": len(list(database.failures(state=FailureState.SHRUNK).fetch(key))),
            "sweep": swept.get(target.nodeid, "not run"),
        })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**stamp(), "seconds": args.seconds, "properties": rows}, indent=2))
    table = Table(title="HypoFuzz, per property (example database)")
    for column in ("test", "sweep", "examples", "behaviors", "fingerprints", "seconds", "failures"):
        table.add_column(column, justify="left" if column == "test" else "right")
    for row in sorted(rows, key=lambda r: (-r["failures"], r["test"])):
        table.add_row(*(str(row[c]) for c in ("test", "sweep", "examples", "behaviors", "fingerprints", "seconds",
                                              "failures")))
    Console(width=160).print(table)
    print(f"fuzz: sweep ran {sum(r['sweep'] != 'not run' for r in rows)} of {len(rows)} properties; HypoFuzz "
          f"{sum(r['examples'] for r in rows)} examples over {sum(r['examples'] > 0 for r in rows)} of them; "
          f"{sum(r['failures'] > 0 for r in rows)} failing; {out / 'report.json'}")


def sweep_outcomes(junit: Path) -> dict[str, str]:
    """{pytest node id: passed | failed | skipped} of the sweep step's junit report."""
    if not junit.is_file():
        return {}
    outcomes = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        state = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        outcomes[node_id(case.get("classname", ""), case.get("name"), REPO)] = state
    return outcomes


def node_id(classname: str, name: str, root: Path) -> str:
    """pytest's node id of a junit testcase: its classname is the module's dotted path and then
    any classes holding the test (a state machine's runTest sits in one), so the module is the
    longest prefix that is a file under `root`, and the classes join the name with "::"."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        module = "/".join(parts[:cut]) + ".py"
        if (root / module).is_file():
            return "::".join([module, *parts[cut:], name])
    return "::".join(["/".join(parts) + ".py", name])


if __name__ == "__main__":
    main()
