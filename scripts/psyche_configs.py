"""Run every state.toml of a Psyche checkout's config/ folder for a few rounds on CPU.

    scripts/psyche_configs.sh PSYCHE_CHECKOUT [--rounds 3] [--out results/psyche-configs]

Each config runs as the testnet runs it (2 clients at tiers 0,1). Where it names data or a
model this machine cannot reach, the run substitutes what matsim can run here, and only
that: --data-location dummy for remote data, and for a model on a hub the stand-in
config.json of its architecture (configs/stand-ins/). Optimizers and schedules are never
substituted. Prints a table (config, ran or the reason, overrides used) and writes it to
OUT/table.json."""
import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sim.cli import run_scenario  # noqa: E402
from sim.config import load_config  # noqa: E402
from sim.errors import SimError  # noqa: E402
from sim.memory import analytic  # noqa: E402

STAND_INS = {"HfLlama": REPO / "configs" / "stand-ins" / "llama", "HfNanoGPT": REPO / "configs" / "stand-ins" / "nanogpt"}


def architecture(state: Path) -> str:
    """The architecture a state.toml names (either layout); HfLlama where it names none."""
    try:
        table = tomllib.loads(state.read_text())
    except tomllib.TOMLDecodeError:
        return "HfLlama"
    llm = table.get("model", {}).get("LLM", {})
    return llm.get("architecture") or table.get("model_extra_data", {}).get("architecture") or "HfLlama"


def too_big(directory: Path, needed: dict) -> str | None:
    """Why a config cannot run here at all: one peer's step would need more than half of
    this machine's memory (matsim's analytic estimate, sim/memory.py)."""
    config = load_config(directory, **needed)
    batch = max(1, config.global_batch(0) // 2)
    need = analytic(config.model, 0, batch, config.seq_len).total
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have / 2:
        return (f"one peer's step needs ~{need / 2**30:.0f} GiB ({batch} x {config.seq_len} tokens of the global batch "
                f"{config.global_batch(0)}, split over 2 clients); this machine has {have / 2**30:.0f} GiB")
    return None


def overrides_for(directory: Path) -> dict:
    """The data and model substitutions this config needs here (none if it loads as it is)."""
    needed = {}
    try:   # the model first: the data is only known once a model loads
        config = load_config(directory)
    except SimError as err:
        if "--model-config" not in str(err):
            raise
        needed["model_config"] = STAND_INS.get(architecture(directory / "state.toml"), STAND_INS["HfLlama"])
        config = load_config(directory, **needed)
    if config.data is None:
        needed["data_location"] = "dummy"
    return needed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a Psyche checkout (its config/ folder is searched for state.toml)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/psyche-configs")
    args = parser.parse_args(argv)
    root = Path(args.checkout) / "config"
    if not root.is_dir():
        print(f"psyche_configs: {root} is not a directory: give a Psyche checkout", file=sys.stderr)
        return 2
    rows = []
    for state in sorted(root.rglob("state.toml")):
        name, directory = str(state.parent.relative_to(root)), state.parent
        row = {"config": name, "ran": False, "reason": "", "overrides": {}}
        try:
            needed = overrides_for(directory)
            row["reason"] = too_big(directory, needed) or ""
            row["overrides"] = {k: str(Path(v).relative_to(REPO)) if k == "model_config" else v
                                for k, v in needed.items()}
            if row["reason"]:
                rows.append(row)
                continue
            meta = run_scenario(directory, "0,1", None, Path(args.out) / name.replace("/", "_"), name=name,
                                kind="heterogeneous", oracle=None, seed=0, rounds=args.rounds, faults=None,
                                echo=False, data_location=needed.get("data_location"),
                                model_config=needed.get("model_config"))
            summary = json.loads((Path(args.out) / name.replace("/", "_") / "summary.json").read_text())
            row.update(ran=True, reason=f"{meta['rounds']} rounds, {meta['optimizer']}, "
                                        f"loss {summary['first_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f}")
        except SimError as err:
            row["reason"] = str(err)
        rows.append(row)
    table = Table("config", "ran", "result or reason", "overrides")
    for row in rows:
        table.add_row(row["config"], "yes" if row["ran"] else "no", row["reason"],
                      ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "none")
    Console(width=200).print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(row["ran"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
