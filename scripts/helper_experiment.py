#!/usr/bin/env python
"""Does helper mode close a heterogeneous run's gap to the homogeneous oracle?
Runs tiers 0,1,1 with helper fractions 0, 0.25 and 0.5 and the oracle 0,0,0 over
several seeds, prints the final held-out loss gap per fraction (mean and spread
over seeds) and plots the seed-mean loss curves.

    .venv/bin/python -m scripts.helper_experiment --config-path test-nanogpt-small --rounds 60 --seeds 5
"""
import argparse
import statistics
from pathlib import Path

from sim.config import load_config
from sim.run import simulate

FRACTIONS = (0.0, 0.25, 0.5)


def experiment(config_path: str, rounds: int, seeds: int, tiers=(0, 1, 1)) -> dict:
    run = load_config(config_path)
    curves = {}
    for label, peer_tiers, fraction in [("oracle 0,0,0", [0] * len(tiers), 0.0),
                                        *((f"0,1,1 helpers {f}", list(tiers), f) for f in FRACTIONS)]:
        fractions = [0.0 if t == 0 else fraction for t in peer_tiers]
        results = [simulate(run, peer_tiers, fractions, seed=s, rounds=rounds, eval_every=1, device="cpu")
                   for s in range(seeds)]
        curves[label] = [r.eval_losses for r in results]
    return curves


def report(curves: dict) -> list[dict]:
    oracle = [c[-1] for c in curves["oracle 0,0,0"]]
    rows = []
    for label, runs in curves.items():
        gaps = [run[-1] / o - 1 for run, o in zip(runs, oracle)]
        rows.append({"run": label, "final_loss": statistics.mean(r[-1] for r in runs),
                     "gap_mean": statistics.mean(gaps), "gap_sd": statistics.stdev(gaps) if len(gaps) > 1 else 0.0})
    return rows


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, runs in curves.items():
        mean = [statistics.mean(values) for values in zip(*runs)]
        ax.plot(range(len(mean)), mean, "--" if label.startswith("oracle") else "-", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss of the full model (nats), mean over seeds")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-path", default="test-nanogpt-small")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="results/helper_experiment.png")
    args = parser.parse_args()
    curves = experiment(args.config_path, args.rounds, args.seeds)
    print("| run | final loss (mean) | gap to oracle, mean +- sd over seeds |\n|---|---|---|")
    for row in report(curves):
        print(f"| {row['run']} | {row['final_loss']:.4f} | {row['gap_mean']:+.2%} +- {row['gap_sd']:.2%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot(curves, Path(args.out), f"Helper mode, {args.config_path}, {args.rounds} rounds, {args.seeds} seeds")
    print(f"wrote {args.out}")
