"""Every .toml of a Psyche checkout's config/ folder: does Psyche at HEAD accept it, and does
matsim run it (a few rounds on CPU, 2 clients at tiers 0,1, as the testnet runs it).

    scripts/psyche_configs.sh PSYCHE_CHECKOUT_OR_ITS_CONFIG_FOLDER [--rounds 3] [--micro-batch-size N]
        [--accept-stale-config] [--out results/psyche-configs]

A file is one of: a local testnet's state.toml or a Solana run's config (sim/psyche_schema.py
reads either as Psyche's serde does, then applies the checks Psyche applies), or a data
server's data.toml (DataServerInfo, read with --data-config: not a run config). Where a run
config names data or a model this machine cannot reach, the run substitutes what matsim can
run here, and only that: --data-location dummy for remote data, and for a model on a hub with
no config.json beside the file, the stand-in config.json of its architecture
(sim/configs/stand-ins/). Optimizers, schedules and batches are never substituted. A file Psyche
refuses runs only with --accept-stale-config. Prints the table and writes OUT/table.json,
stamped with the commit that measured it."""
import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scripts import CHECKOUT as REPO
from sim.config import CONFIGS, load_config
from sim.errors import SimError
from sim.provenance import stamp
from sim.psyche_schema import psyche_verdict
from sim.scenario import RunFlags, run_scenario

STAND_INS = {"HfLlama": CONFIGS / "stand-ins" / "llama", "HfNanoGPT": CONFIGS / "stand-ins" / "nanogpt"}


def substitutions(path: Path, table: dict, accept_stale: bool) -> dict:
    """The data and model substitutions this run config needs here (none if it loads as it is)."""
    needed = {}
    try:   # the model first: the data is only known once a model loads
        config = load_config(path, accept_stale=accept_stale)
    except SimError as err:
        if "--model-config" not in str(err):
            raise
        architecture = table.get("model", {}).get("LLM", {}).get("architecture", "HfLlama")
        needed["model_config"] = STAND_INS.get(architecture, STAND_INS["HfLlama"])
        config = load_config(path, accept_stale=accept_stale, **needed)
    if config.data is None:
        needed["data_location"] = "dummy"
    return needed


def account(path: Path, root: Path, args) -> dict:
    """One file's row: what it is, Psyche's verdict, and whether matsim ran it."""
    name = str(path.relative_to(root))
    row = {"file": name, "kind": "", "psyche": "", "ignored": [], "ran": False, "result": "", "overrides": {}}
    if path.name == "data.toml":
        row.update(kind="data server config", psyche="not a run config (DataServerInfo, read with --data-config)",
                   result="not a run config")
        return row
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        row.update(kind="?", psyche=f"not TOML: {err}", result="not TOML")
        return row
    verdict = psyche_verdict(table)
    row.update(kind={"state": "state.toml (local testnet)", "solana": "Solana run config"}[verdict.layout],
               psyche="accepts" if not verdict.refused else "refuses: " + "; ".join(verdict.refused),
               ignored=list(verdict.ignored), solana_would_refuse=list(verdict.solana_would_refuse))
    if verdict.refused and not args.accept_stale_config:
        row["result"] = "not run: Psyche refuses it (--accept-stale-config runs it anyway)"
        return row
    if name in args.not_run:
        row["result"] = "not run here: named by --not-run (its rounds are more than this machine can do in the time)"
        return row
    try:
        needed = substitutions(path, table, args.accept_stale_config)
        row["overrides"] = {k: str(Path(v).relative_to(REPO)) if k == "model_config" else v for k, v in needed.items()}
        out = Path(args.out) / name.replace("/", "_").removesuffix(".toml")
        flags = RunFlags(path, needed.get("data_location"), needed.get("model_config"), args.accept_stale_config,
                         args.micro_batch_size)
        meta = run_scenario(flags, "0,1", None, out, name=name, kind="heterogeneous", oracle=None, seed=0,
                            rounds=args.rounds, faults=None, echo=False)
        summary = json.loads((out / "summary.json").read_text())
        row.update(ran=True, result=f"{meta['rounds']} rounds, {meta['optimizer']}, micro-batch "
                                    f"{meta['micro_batch_size'] or 'whole'}, loss {summary['first_eval_loss']:.3f} "
                                    f"-> {summary['final_eval_loss']:.3f}")
    except SimError as err:
        row["result"] = str(err)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a Psyche checkout, or its config/ folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, help="Psyche's client flag, for every run")
    parser.add_argument("--accept-stale-config", action="store_true", help="run the files Psyche refuses too")
    parser.add_argument("--only", help="comma-separated files (relative to the config folder)")
    parser.add_argument("--not-run", type=lambda files: set(files.split(",")), default=set(),
                        help="comma-separated files to account for (Psyche's verdict) without running them")
    parser.add_argument("--out", default="results/psyche-configs")
    parser.add_argument("--write", action="store_true", help="publish the table as docs/data/psyche_configs.json")
    args = parser.parse_args(argv)
    given = Path(args.checkout)
    root = given / "config" if (given / "config").is_dir() else given
    if not root.is_dir():
        print(f"psyche_configs: {given} is neither a Psyche checkout nor its config/ folder", file=sys.stderr)
        return 2
    files = sorted(root.rglob("*.toml"))
    if args.only:
        files = [f for f in files if str(f.relative_to(root)) in args.only.split(",")]
    rows = [account(path, root, args) for path in files]
    table = Table("file", "kind", "Psyche at HEAD", "matsim", "overrides")
    for row in rows:
        table.add_row(row["file"], row["kind"], row["psyche"], ("ran: " if row["ran"] else "") + row["result"],
                      ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "none")
    Console(width=240).print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    psyche = subprocess.run(["git", "-C", str(given), "rev-parse", "HEAD"], capture_output=True, text=True)
    text = json.dumps({**stamp(), "psyche_commit": psyche.stdout.strip() if psyche.returncode == 0 else None,
                       "rounds": args.rounds, "micro_batch_size": args.micro_batch_size,
                       "accept_stale_config": args.accept_stale_config, "files": rows}, indent=2) + "\n"
    (Path(args.out) / "table.json").write_text(text)
    if args.write:
        (REPO / "docs" / "data" / "psyche_configs.json").write_text(text)
    runnable = [row for row in rows if row["kind"] and row["kind"] != "data server config"
                and (row["psyche"] == "accepts" or args.accept_stale_config)
                and row["file"] not in args.not_run]
    return 0 if all(row["ran"] for row in runnable) else 1


if __name__ == "__main__":
    sys.exit(main())
