"""Memory per tier: measured peak of one training step, and an analytic breakdown.

Measured: one step (forward, backward, DisTrO compress) of a peer that holds a
sliced model at its tier, in a fresh process per tier, since peak RSS is
process-wide and never falls. On CPU the figure is peak RSS minus the RSS
before the model exists (torch itself excluded); on GPU it is
torch.cuda.max_memory_allocated.

Analytic: fp32 parameters, gradients, DisTrO state (one delta per parameter)
and the activations autograd keeps, counted tensor by tensor for this
implementation (per token and layer: ~8H + 4*kv for attention, 4w (SwiGLU) or
3w (relu²) for the FFN of width w; 2V + 2H for embeddings, head and loss).
"""
import json
import os
import resource
import subprocess
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from sim.config import ModelConfig, load_config
from sim.data import held_out_count
from sim.distro import DistroState
from sim.errors import ConfigError
from sim.model import build_model, default_device, param_count, random_tokens
from sim.peer import train_and_compress
from sim.provenance import stamp
from sim.tiers import layer_widths

BYTES = 4  # fp32
LLAMA_SHAPES = {  # public shapes: TinyLlama-1.1B, Llama-2-7B
    "llama-1b": (ModelConfig("llama", 32000, 2048, 5632, 22, 32, 4), 1, 2048),
    "llama-7b": (ModelConfig("llama", 32000, 4096, 11008, 32, 32, 32), 1, 2048),
}


@dataclass(frozen=True)
class Breakdown:
    parameters: int
    gradients: int
    distro_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.distro_state + self.activations


def layer_floats(cfg: ModelConfig, width: int) -> int:
    """Floats per token one layer holds: ~8H + 4*kv for attention, 4w (SwiGLU) or 3w (relu²)
    for its FFN of width w."""
    kv = cfg.num_key_value_heads * cfg.head_dim
    return 8 * cfg.hidden_size + 4 * kv + (4 if cfg.style == "llama" else 3) * width


def analytic(cfg: ModelConfig, tier: int, batch: int, seq_len: int) -> Breakdown:
    params = param_count(cfg, tier) * BYTES
    per_token = sum(layer_floats(cfg, w) for w in layer_widths(cfg.intermediate_size, tier, cfg.num_hidden_layers))
    per_token += 2 * cfg.vocab_size + 2 * cfg.hidden_size
    return Breakdown(params, params, params, per_token * batch * seq_len * BYTES)


def largest_piece(batch: int, micro_batch_size: int | None) -> int:
    """Sequences in the largest micro-batch of Psyche's split of `batch` (sim.peer.micro_batches)."""
    if micro_batch_size is None or micro_batch_size >= batch:
        return batch
    return -(-batch // -(-batch // micro_batch_size))


def step_bytes(config, tier: int, batch: int) -> int:
    """One trainer's step at `tier` on `batch` sequences, in its config's micro-batches: the
    analytic total, activations of the largest micro-batch (they are freed between pieces)."""
    return analytic(config.model, tier, largest_piece(batch, config.micro_batch_size), config.seq_len).total


def eval_bytes(config) -> int:
    """The held-out evaluation (sim.run.Network.eval_loss): a forward without autograd of the
    full model over the held-out batch in the config's micro-batches: the weights, and per
    token of the largest piece its logits and their log-softmax (2V) and one layer's working
    set at a time (the attention terms, and the FFN's at its full width)."""
    cfg = config.model
    piece = largest_piece(held_out_count(config.global_batch_size), config.micro_batch_size)
    per_token = 2 * cfg.vocab_size + layer_floats(cfg, cfg.intermediate_size)
    return param_count(cfg, 0) * BYTES + per_token * piece * config.seq_len * BYTES


def memory_budget() -> int:
    """What one trainer's step may take: half of this machine's memory (or of the GPU's)."""
    if default_device().type == "cuda":
        return torch.cuda.get_device_properties(0).total_memory // 2
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def check_fits(config, trainers: int) -> None:
    """Refuse a run whose trainer's step, or whose held-out evaluation, would not fit
    (`memory_budget`), naming --micro-batch-size and the largest that fits: the widest trainer,
    with its share of round 0's global batch (Psyche's split over `trainers`)."""
    batch, budget = -(-config.global_batch(0) // trainers), memory_budget()
    held = held_out_count(config.global_batch_size)
    step, evaluation = step_bytes(config, 0, batch), eval_bytes(config)
    if max(step, evaluation) <= budget:
        return

    def fits(micro: int) -> bool:
        run = config.replace(micro_batch_size=micro)
        return max(step_bytes(run, 0, batch), eval_bytes(run)) <= budget
    fitting = [m for m in range(1, max(batch, held) + 1) if fits(m)]
    advice = (f"give --micro-batch-size {fitting[-1]} (the largest that fits: a step's pieces of at most "
              f"{largest_piece(batch, fitting[-1])} sequences, the evaluation's of at most "
              f"{largest_piece(held, fitting[-1])}; Psyche's default is 1)" if fitting
              else "no micro-batch fits: even one sequence's step does not")
    what = (f"one trainer's step needs ~{human(step)} ({largest_piece(batch, config.micro_batch_size)} x "
            f"{config.seq_len} tokens at once of its {batch} sequences)" if step >= evaluation else
            f"the held-out evaluation needs ~{human(evaluation)} ({largest_piece(held, config.micro_batch_size)} x "
            f"{config.seq_len} tokens at once of its {held} sequences)")
    raise ConfigError(f"{what}, over the {human(budget)} a step may take here (half of this machine's): {advice}")


def human(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across fork and exec, so a child started by a large process (a test session
    holding big models) would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_step_here(config_path: str, tier: int, seed: int = 0, micro_batch_size: int | None = None) -> dict:
    """Peak memory of one training step at `tier` (in micro-batches of at most
    `micro_batch_size` sequences), in this process."""
    run = load_config(config_path)
    device = default_device()
    batch = run.client_batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _rss_bytes()
    widths = layer_widths(run.model.intermediate_size, tier, run.model.num_hidden_layers)
    model = build_model(run.model, tier, seed=seed, device=device, stored_widths=widths)
    tokens = random_tokens(run.model, batch, run.seq_len + 1, seed=seed, device=device)
    train_and_compress(model, DistroState.fresh(run.distro), tokens, run.lr_schedule.base_lr, peer=0, round_=0,
                       micro_batch_size=micro_batch_size)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes() - before
    return {"config": run.name, "tier": tier, "device": device.type, "batch": batch, "seq_len": run.seq_len,
            "micro_batch_size": micro_batch_size, "peak_bytes": peak}


def measure_step(config_path: str, tier: int, seed: int = 0, micro_batch_size: int | None = None) -> dict:
    """measure_step_here in a fresh interpreter, so earlier peaks do not hide this one."""
    code = (f"import json, sim.memory as m; print(json.dumps(m.measure_step_here({str(config_path)!r}, {tier}, {seed}, "
            f"{micro_batch_size})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bar_chart(rows: list[tuple[str, int, Breakdown]], path) -> None:
    """One panel per model, stacked bars per tier (parameters, gradients, DisTrO state,
    activations), each panel on its own linear scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(model for model, _, _ in rows))
    parts = ("parameters", "gradients", "distro_state", "activations")
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [(tier, b) for m, tier, b in rows if m == model]
        scale, unit = (2**30, "GiB") if max(b.total for _, b in mine) >= 2**30 else (2**20, "MiB")
        bottom = [0.0] * len(mine)
        for part in parts:
            heights = [getattr(b, part) / scale for _, b in mine]
            ax.bar([f"tier {t}" for t, _ in mine], heights, bottom=bottom, label=part.replace("_", " "))
            bottom = [a + h for a, h in zip(bottom, heights)]
        for x, (total, (_, b)) in enumerate(zip(bottom, mine)):
            ax.annotate(f"{b.total / mine[0][1].total - 1:+.0%}" if x else "", (x, total), ha="center", va="bottom", fontsize=8)
        ax.set_title(model, fontsize=9)
        ax.set_ylabel(unit)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("One training step per tier (analytic, fp32)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs, tiers: list[int], outdir: Path, out) -> None:
    """`matsim memory`: measured and analytic memory per tier, printed, charted and written
    (memory.json, stamped with the commit) to `outdir`."""
    measured = Table("config", "tier", "FFN width", "device", "tokens", "peak", "vs tier 0",
                     "analytic", "analytic vs tier 0", title="Measured: one training step per tier")
    records = []
    for run in runs:
        base = None
        for tier in tiers:
            row = measure_step(str(run.path), tier, micro_batch_size=run.micro_batch_size)
            estimate = step_bytes(run, tier, run.client_batch)
            base = base or (row["peak_bytes"], estimate)
            records.append({**row, "analytic_bytes": estimate})
            measured.add_row(run.name, str(tier), str(run.model.intermediate_size >> tier), row["device"],
                             f"{run.client_batch}x{run.seq_len}", human(row["peak_bytes"]), f"{row['peak_bytes'] / base[0] - 1:+.1%}",
                             human(estimate), f"{estimate / base[1] - 1:+.1%}")
    out.print(measured)
    breakdown_table = Table("model", "tokens", "tier", "parameters", "gradients", "DisTrO state", "activations", "total",
                     "vs tier 0", title="Analytic breakdown (fp32)")
    bars, breakdown = [], []
    shapes = {run.name: (run.model, largest_piece(run.client_batch, run.micro_batch_size), run.seq_len)
              for run in runs}
    for name, (cfg, batch, seq) in {**shapes, **LLAMA_SHAPES}.items():
        base = analytic(cfg, 0, batch, seq).total
        for tier in tiers:
            b = analytic(cfg, tier, batch, seq)
            breakdown_table.add_row(name, f"{batch}x{seq}", str(tier), human(b.parameters), human(b.gradients),
                             human(b.distro_state), human(b.activations), human(b.total), f"{b.total / base - 1:+.1%}")
            bars.append((name, tier, b))
            breakdown.append({"model": name, "tokens": f"{batch}x{seq}", "tier": tier, **dataclasses.asdict(b),
                              "total": b.total})
    out.print(breakdown_table)
    outdir.mkdir(parents=True, exist_ok=True)
    bar_chart(bars, outdir / "memory.png")
    (outdir / "memory.json").write_text(json.dumps({**stamp(), "measured": records, "analytic": breakdown},
                                                   indent=2) + "\n")
    out.print(f"wrote {outdir / 'memory.png'} and {outdir / 'memory.json'}")
