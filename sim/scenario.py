"""One testnet run, as `matsim testnet start` and each scenario of the matrix play it: the
flags that shape the run (`RunFlags`) become a validated RunConfig, the run writes its
results directory (metrics.jsonl, timing.jsonl, summary.json, scenario.json, run.log), and
scenario.json names everything that decided the run: modes, substitutions, a config Psyche
refuses that it ran anyway, the keys Psyche ignores."""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sim.config import load_config
from sim.sources import remote_data_error
from sim.distributed import simulate_distributed
from sim.errors import ConfigError
from sim.faults import parse_network_faults
from sim.memory import check_fits
from sim.run import simulate
from sim.tiers import parse_client_tiers


def console() -> Console:
    """Rich console; off a terminal (logs, CI, pipes) wide enough that tables never wrap."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=160)


@dataclass(frozen=True)
class RunFlags:
    """What a command line says about the run itself (the testnet's and the matrix's flags)."""
    config_path: str | Path
    data_location: str | None = None      # --data-location: dummy or a byte corpus, for data matsim cannot reach
    model_config: str | Path | None = None   # --model-config: a config.json for a model on a hub
    accept_stale: bool = False            # --accept-stale-config: run a file Psyche at HEAD refuses
    micro_batch_size: int | None = None   # --micro-batch-size (Psyche's client flag)
    rotation_interval: int | None = None  # --matformer-helper-rotation-interval (Psyche's client flag)
    modes: dict = field(default_factory=dict)   # --matformer-mean-semantics, --apply-rule, --zero-blocks
    # --fault-latency-ms, --fault-packet-loss, --fault-bandwidth-limit, --fault-seed (Psyche's; sim/faults.py)
    network: tuple = (None, None, None, None)

    def network_faults(self, seed: int):
        """The network faults these flags ask for (None: no flag), seeded by --fault-seed or the run's seed."""
        return parse_network_faults(*self.network, run_seed=seed)

    def load(self):
        """The validated RunConfig these flags describe."""
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size {self.micro_batch_size} is invalid: expected an integer >= 1 "
                              f"(sequences a trainer's batch is split into)")
        if self.rotation_interval is not None and self.rotation_interval < 1:
            raise ConfigError(f"--matformer-helper-rotation-interval {self.rotation_interval} is invalid: expected "
                              f"an integer >= 1 (rounds per helper rotation epoch)")
        run = load_config(self.config_path, data_location=self.data_location, model_config=self.model_config,
                          accept_stale=self.accept_stale)
        changes = {key: value for key, value in self.modes.items() if value is not None}
        if "zero_blocks" in changes:
            changes["distro"] = dataclasses.replace(run.distro, zero_blocks=changes.pop("zero_blocks"))
        if self.micro_batch_size is not None:
            changes["micro_batch_size"] = self.micro_batch_size
        if self.rotation_interval is not None:
            changes["helper_rotation_interval"] = self.rotation_interval
        return run.replace(**changes)


def parse_fractions(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--client-matformer-helper-fractions {text!r} is not a comma-separated list of "
                          f"numbers in [0, 1], e.g. 0,0,0") from None


def run_scenario(flags: RunFlags, tiers_text: str, helper_text: str | None, out: Path, *, name: str, kind: str,
                 oracle: str | None, seed: int, rounds: int | None, faults: str | None,
                 exit_after: float | None = None, eval_every: int | None = None, backend: str = "inprocess",
                 echo: bool = True, batching: str = "auto", checkpoints: dict | None = None) -> dict:
    """One testnet run: validated first, then metrics, summary, scenario.json and a log whose
    lines carry `loss=` (the chapter's grep reads them) under `out`."""
    run = flags.load()
    if run.data is None:
        raise remote_data_error(run)
    tiers, helpers = parse_client_tiers(tiers_text), parse_fractions(helper_text)
    check_fits(run, len(tiers))
    rounds = rounds or run.total_steps
    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "run.log", "w")
    terminal = console()
    # A progress bar on a terminal; plain log lines (with loss=) for logs, pipes and CI.
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"), console=terminal) if terminal.is_terminal and echo else None
    task = bar.add_task(name, total=rounds, status="") if bar else None

    def line(record):
        rejected = ",".join(f"{k}:{v}" for k, v in record["rejected"].items()) or "none"
        faulted = ",".join(f"{k}:{v}" for k, v in record["faults"].items()) or "none"
        text = (f"[{name}] round {record['round'] + 1}/{rounds} contributing={record['contributing_peers']} "
                f"rejected={rejected} faults={faulted} bytes={record['bytes_sent']} "
                f"train_loss={record['loss']:.4f}")
        if record["eval_loss"] is not None:  # only evaluated rounds carry loss=, which the chapter's grep reads
            text += f" loss={record['eval_loss']:.4f}"
            status = f"loss={record['eval_loss']:.4f} contributing={record['contributing_peers']}"
        logfile.write(text + "\n")
        if bar:
            bar.update(task, advance=1, **({"status": status} if record["eval_loss"] is not None else {}))
        elif echo:
            terminal.print(text, highlight=False, markup=False)

    for reason in run.refused:   # said before the run, as it is recorded after
        terminal.print(f"warning: {flags.config_path}: run although Psyche at HEAD refuses it: {reason}",
                       highlight=False, markup=False)
    try:
        if bar:
            bar.start()
        options = {} if backend == "distributed" else {"batching": batching}   # one process per peer: nothing to batch
        runner = simulate_distributed if backend == "distributed" else simulate
        network = flags.network_faults(seed)
        result = runner(run, tiers, helpers, faults, seed, rounds=rounds, out=out, deadline_s=exit_after,
                        eval_every=eval_every, on_round=line, network_faults=network, **(checkpoints or {}), **options)
    finally:
        if bar:
            bar.stop()
        logfile.close()
    meta = {"name": name, "tiers": tiers_text, "helpers": helper_text, "kind": kind, "oracle": oracle,
            "rounds": len(result.records), "config": run.name, "config_path": str(run.path), "seed": seed,
            "faults": faults or "none", "network_faults": dataclasses.asdict(network) if network else None,
            "backend": backend, "peer_batching": batching, "modes": run.modes,
            "optimizer": run.optimizer, "lr_schedule": repr(run.lr_schedule), "data_location": run.data_location,
            "data": run.data, "checkpoint": run.checkpoint, "micro_batch_size": run.micro_batch_size,
            "overrides": [{"key": k, "config": was, "used": used} for k, was, used in run.overrides],
            "psyche_refuses": list(run.refused), "psyche_ignores": list(run.ignored),
            "init_checkpoint": str((checkpoints or {}).get("init_checkpoint")) if (checkpoints or {}).get(
                "init_checkpoint") else None}
    (out / "scenario.json").write_text(json.dumps(meta, indent=2))
    return meta
