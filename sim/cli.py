"""`matsim` command line. User errors become one line on stderr and exit 2."""
import argparse
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from sim.config import DEFAULT_CONFIG, load_config
from sim.errors import SimError
from sim.model import build_model, default_device, param_count, random_tokens
from sim.tiers import parse_int_list, tier_width


def console() -> Console:
    """Rich console; off a terminal (logs, CI, pipes) wide enough that tables never wrap."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=160)


class UsageError(SimError):
    """A command line argparse could not read."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def cmd_tiers(args) -> None:
    """Table of tiers for a config: FFN width, parameters, share of the full
    model, and one real training step (forward, backward, sign-SGD) per tier."""
    cfg = load_config(args.config_path)
    m = cfg.model
    tiers = parse_int_list(args.tiers, "--tiers") if args.tiers else tuple(range(min(m.max_tier, 3) + 1))
    widths = [tier_width(m.intermediate_size, t) for t in tiers]  # validates before any work
    device = default_device()
    batch = args.batch or -(-cfg.global_batch_size // cfg.min_clients)
    tokens = random_tokens(m, batch, cfg.seq_len, args.seed, device)
    out = console()
    out.print(f"[bold]{cfg.name}[/]: {m.style}-style, hidden {m.hidden_size}, FFN {m.intermediate_size}, "
                  f"{m.num_hidden_layers} layers, vocab {m.vocab_size}; step on {device} with "
                  f"{batch}x{cfg.seq_len} tokens, seed {args.seed}")
    table = Table("tier", "FFN width", "parameters", "share of full", "loss before", "loss after", "step ms")
    full = param_count(m, 0)
    if args.step:
        _one_step(cfg, tiers[0], tokens, args.seed)  # warm-up: first-call allocation is not a tier's cost
    for tier, width in zip(tiers, widths):
        count = param_count(m, tier)
        row = [str(tier), f"{width}/{m.intermediate_size}", f"{count:,}", f"{count / full:.1%}"]
        if args.step:
            before, after, ms = _one_step(cfg, tier, tokens, args.seed)
            row += [f"{before:.4f}", f"{after:.4f}", f"{ms:.0f}"]
        else:
            row += ["-", "-", "-"]
        table.add_row(*row)
    out.print(table)


def _one_step(cfg, tier, tokens, seed) -> tuple[float, float, float]:
    """Loss before, loss after, and milliseconds of one fwd+bwd+update at `tier`."""
    model = build_model(cfg.model, tier, seed=seed, device=tokens.device)
    lr = cfg.lr_schedule.base_lr
    start = time.perf_counter()
    _, loss = model(tokens, tokens.roll(-1, dims=1))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad.sign()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    with torch.no_grad():
        _, after = model(tokens, tokens.roll(-1, dims=1))
    return loss.item(), after.item(), ms


def build_parser() -> Parser:
    parser = Parser(prog="matsim", description="Verification harness for heterogeneous MatFormer training.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    tiers = commands.add_parser("tiers", help="tier table and one training step per tier")
    tiers.add_argument("--config-path", default=DEFAULT_CONFIG, help="config directory or bundled config name")
    tiers.add_argument("--tiers", help="comma-separated tiers (default: 0..3 or the deepest valid)")
    tiers.add_argument("--batch", type=int, default=0, help="sequences per step (default: per-client share)")
    tiers.add_argument("--seed", type=int, default=0)
    tiers.add_argument("--no-step", dest="step", action="store_false", help="table only, no training step")
    tiers.set_defaults(run=cmd_tiers)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except SimError as err:
        print(f"matsim: error: {err}", file=sys.stderr)
        return 2
    return 0
