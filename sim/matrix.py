"""The verification chapter's scenario matrix (`matsim matrix`, `make run`): every scenario of
sim/analyze.py's MATRIX as its own testnet run, one process per core, into one results
directory that `matsim analyze` then judges. The chapter's unit tests, which its matrix
script runs first, are `make run`'s first step (the tests are not part of the package)."""
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from sim import analyze as analysis
from sim.errors import ConfigError
from sim.scenario import RunFlags, console, run_scenario


def scenarios(flags: RunFlags, out: Path, *, seed: int, rounds: int | None, only: str | None, echo: bool,
              batching: str) -> list[dict]:
    """The matrix's runs (`only`: comma-separated names), validated before any runs."""
    flags.load()
    names = [name for name, *_ in analysis.MATRIX]
    chosen = only.split(",") if only else names
    if unknown := [name for name in chosen if name not in names]:
        raise ConfigError(f"--only names unknown scenarios {unknown}: the matrix has {', '.join(names)}")
    return [dict(flags=flags, tiers_text=tiers, helper_text=helpers, out=out / name, name=name, kind=kind,
                 oracle=oracle, seed=seed, rounds=rounds, faults=None, echo=echo, batching=batching)
            for name, tiers, helpers, kind, oracle in analysis.MATRIX if name in chosen]


def run_matrix(runs: list[dict], jobs: int | None) -> None:
    """Play the runs, `jobs` at a time (default: every core)."""
    jobs = jobs or os.cpu_count() or 1
    console().print(f"=== Scenarios ({len(runs)}, {jobs} at a time) ===")
    if jobs == 1:
        for run in runs:
            _scenario(run)
        return
    # Spawned, one torch thread each: a fork after torch's thread pool started can deadlock.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker) as pool:
        for _ in pool.map(_scenario, runs):
            pass


def _worker() -> None:
    """A matrix job's process: one torch thread (the other scenarios run on the other
    cores), and it ends when the matrix process does, however that ends (a SIGTERM or
    SIGKILL gives the pool no chance to stop its workers, which then ran on, writing)."""
    torch.set_num_threads(1)
    parent = multiprocessing.parent_process()
    threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()


def _scenario(run: dict) -> None:
    tick = time.perf_counter()
    meta = run_scenario(**run)
    summary = json.loads((run["out"] / "summary.json").read_text())
    console().print(f"{meta['name']} ({meta['tiers']}{'; helpers ' + meta['helpers'] if meta['helpers'] else ''}): "
                    f"{meta['rounds']} rounds, final loss={summary['final_eval_loss']:.4f} "
                    f"(floor {summary['loss_floor']:.4f}) in {time.perf_counter() - tick:.0f} s", highlight=False)
