"""`matsim` command line. User errors become one line on stderr and exit 2."""
import argparse
import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from rich.panel import Panel
from rich.table import Table

from sim import analyze as analysis
from sim import matrix, memory, vectors
from sim.checkpoint import LOAD_STRATEGIES, LoadInfo, export_tiers, load_checkpoint, parse_size
from sim.config import APPLY_RULES, DEFAULT_CONFIG, MATRIX_CONFIG, MEAN_SEMANTICS, STALE_FLAG, ZERO_BLOCKS, load_config
from sim.errors import ConfigError, SimError
from sim.model import build_model, default_device, param_count, random_tokens
from sim.faults import parse_fault_spec
from sim.run import check_every, validate_assignment
from sim.scenario import RunFlags, console, parse_fractions, run_scenario
from sim.schema import checkpoint_schema_hash
from sim.sources import remote_data_error
from sim.distributed import run_peer, torchrun_rank
from sim.engine import BATCHING
from sim.tiers import parse_client_tiers, parse_int_list, tier_width


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
    batch = args.batch or cfg.client_batch
    tokens = random_tokens(m, batch, cfg.seq_len, args.seed, device)
    out = console()
    out.print(f"[bold]{cfg.name}[/]: {m.style}-style, hidden {m.hidden_size}, FFN {m.intermediate_size}, "
                  f"{m.num_hidden_layers} layers, vocab {m.vocab_size}; step on {device} with "
                  f"{batch}x{cfg.seq_len} tokens, seed {args.seed}")
    table = Table("tier", "FFN width", "parameters", "share of full", "loss before", "loss after", "step ms")
    full = param_count(m, 0)
    weights = None
    if args.checkpoint:
        model, info = load_checkpoint(args.checkpoint, min(tiers), args.matformer_load_strategy, device=device,
                                      expected=m)
        out.print(startup_summary(info))
        weights = model.state_dict()
    if args.step:
        _one_step(cfg, tiers[0], tokens, args.seed, weights)  # warm-up: first-call allocation is not a tier's cost
    for tier, width in zip(tiers, widths):
        count = param_count(m, tier)
        row = [str(tier), f"{width}/{m.intermediate_size}", f"{count:,}", f"{count / full:.1%}"]
        if args.step:
            before, after, ms = _one_step(cfg, tier, tokens, args.seed, weights)
            row += [f"{before:.4f}", f"{after:.4f}", f"{ms:.0f}"]
        else:
            row += ["-", "-", "-"]
        table.add_row(*row)
    out.print(table)


def _one_step(cfg, tier, tokens, seed, weights=None) -> tuple[float, float, float]:
    """Loss before, loss after, and milliseconds of one fwd+bwd+update at `tier`,
    from `weights` (a checkpoint's state dict) or a fresh init from `seed`."""
    stored = None if weights is None else [weights["model.layers.0.mlp.up_proj.weight"].shape[0]] * cfg.model.num_hidden_layers
    model = build_model(cfg.model, tier, seed=seed, device=tokens.device, stored_widths=stored)
    if weights is not None:
        model.load_state_dict(weights)
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


def startup_summary(info: LoadInfo) -> Panel:
    """Psyche's MATFORMER CONFIGURATION box: what a peer loaded and how it will run."""
    lines = [
        f"checkpoint       {info.checkpoint}",
        f"load strategy    {info.strategy} -> {info.resolved}",
        f"sliced           {'yes, stored tier ' + str(info.stored_tier) if info.sliced else 'no (full weights)'}",
        f"tier             CLI {info.requested_tier} -> effective {info.effective_tier}",
        f"helper mode      {'on' if info.helper_mode else 'off'} ({info.helper_reason})",
        f"FFN width        {info.ffn_width} / {info.base_intermediate_size}",
    ]
    return Panel("\n".join(lines), title="MATFORMER CONFIGURATION", expand=False)


def cmd_export_tiers(args) -> None:
    written = export_tiers(args.checkpoint, parse_int_list(args.tiers, "--tiers"), args.out,
                           parse_size(args.max_shard_size) if args.max_shard_size else None)
    for path in written:
        print(f"wrote {path} (schema {checkpoint_schema_hash(path)[:16]})")


def cmd_print_schema_hash(args) -> None:
    load_checkpoint(args.checkpoint, args.matformer_tier, args.matformer_load_strategy, device="cpu")
    print(checkpoint_schema_hash(args.checkpoint))


def cmd_memory(args) -> None:
    tiers = parse_int_list(args.tiers, "--tiers")
    runs = [load_config(path).replace(micro_batch_size=args.micro_batch_size)
            for path in args.config_path or ["test-nanogpt-small", DEFAULT_CONFIG]]
    for run in runs:
        for tier in tiers:
            tier_width(run.model.intermediate_size, tier)
    memory.report(runs, tiers, Path(args.out), console())


def run_flags(args) -> RunFlags:
    """The flags of `testnet start` and `matrix` that shape the run itself."""
    flags = RunFlags(args.config_path, getattr(args, "data_location", None), getattr(args, "model_config", None),
                     args.accept_stale_config, args.micro_batch_size,
                     getattr(args, "matformer_helper_rotation_interval", None), mode_flags(args),
                     (args.fault_latency_ms, args.fault_packet_loss, args.fault_bandwidth_limit, args.fault_seed))
    flags.network_faults(args.seed)   # bad values: one line, before anything runs
    return flags


def _validate_testnet(args):
    """Everything that can be wrong with the flags, before anything is written: the run config."""
    run = run_flags(args).load()
    if run.data is None:
        raise remote_data_error(run)
    args.client_matformer_tiers = client_tiers_flag(args, run)
    tiers = parse_client_tiers(args.client_matformer_tiers)
    if args.num_clients is not None and len(tiers) != args.num_clients:
        raise ConfigError(f"--client-matformer-tiers {args.client_matformer_tiers} names {len(tiers)} clients but "
                          f"--num-clients is {args.num_clients}: give one tier per client")
    validate_assignment(run, tiers, parse_fractions(args.client_matformer_helper_fractions))
    _validate_checkpoints(args, run, tiers)
    parse_fault_spec(args.faults)
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds} is invalid: expected an integer >= 1")
    if args.eval_every is not None and args.eval_every < 1:
        raise ConfigError(f"--eval-every {args.eval_every} is invalid: expected an integer >= 1")
    if args.backend == "distributed" and args.peer_batching == "on":
        raise ConfigError("--peer-batching on needs --backend inprocess: the distributed backend runs one process "
                          "per peer, so there is nothing to batch (auto or off)")
    return run


def checkpoint_flags(args) -> dict:
    """simulate's checkpoint arguments from the testnet's flags."""
    if args.client_keep_steps < 1:
        raise ConfigError(f"--client-keep-steps {args.client_keep_steps} is invalid: expected an integer >= 1")
    return {"init_checkpoint": args.init_checkpoint, "checkpoint_every": args.checkpoint_every,
            "max_shard_bytes": parse_size(args.max_shard_size) if args.max_shard_size else None,
            "client_checkpoint_dir": args.client_checkpoint_dir, "client_keep_steps": args.client_keep_steps}


def _validate_checkpoints(args, run, tiers) -> None:
    """--checkpoint-every, --max-shard-size and --init-checkpoint, before anything is written:
    the checkpoint must be the config's model and hold every client's widest tier."""
    check_every(args.checkpoint_every)
    checkpoint_flags(args)
    if args.init_checkpoint:
        for widest in sorted({min(t) if isinstance(t, tuple) else t for t in tiers}):
            _, info = load_checkpoint(args.init_checkpoint, widest, "auto", expected=run.model, device="cpu")
        if info.sliced:   # every client then holds a narrow model: there is no full model to evaluate or save
            raise ConfigError(f"--init-checkpoint {args.init_checkpoint} is an export sliced to tier "
                              f"{info.stored_tier}: a run needs one client holding the full weights; start from "
                              f"the full checkpoint (clients load it at their own tiers)")


def client_tiers_flag(args, run) -> str:
    """The per-client tier list: --client-matformer-tiers, or Psyche's one-client flag
    --matformer-tier given to every client (--num-clients of them, else the config's
    min_clients), so Psyche's launch scripts translate one to one."""
    if args.matformer_tier is None:
        return args.client_matformer_tiers or DEFAULT_CLIENT_TIERS
    if args.client_matformer_tiers is not None:
        raise ConfigError(f"--matformer-tier {args.matformer_tier} and --client-matformer-tiers "
                          f"{args.client_matformer_tiers} both set the tiers: give one of them")
    return ",".join([str(args.matformer_tier)] * (args.num_clients or run.min_clients))


def cmd_testnet(args) -> None:
    run = _validate_testnet(args)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(name)s %(message)s")
    if torchrun_rank():  # a peer rank under torchrun: rank 0 coordinates and writes every result
        run_peer(run, parse_client_tiers(args.client_matformer_tiers),
                 parse_fractions(args.client_matformer_helper_fractions), args.faults, args.seed, rounds=args.rounds,
                 eval_every=args.eval_every, init_checkpoint=args.init_checkpoint,
                 checkpoint_every=args.checkpoint_every, network_faults=run_flags(args).network_faults(args.seed))
        return
    if torchrun_rank() == 0:
        args.backend = "distributed"
    out = Path(args.out or "results/testnet")
    tiers = args.client_matformer_tiers
    kind = "baseline" if set(tiers.split(",")) == {"0"} else "heterogeneous"
    meta = run_scenario(run_flags(args), tiers, args.client_matformer_helper_fractions, out, name="testnet",
                        kind=kind, oracle=None, seed=args.seed, rounds=args.rounds, faults=args.faults,
                        exit_after=args.headless_exit_after_secs, eval_every=args.eval_every, backend=args.backend,
                        batching=args.peer_batching, checkpoints=checkpoint_flags(args))
    summary = json.loads((out / "summary.json").read_text())
    console().print(f"done: {meta['rounds']} rounds{' (stopped at the deadline)' if summary['stopped_early'] else ''}, "
                    f"final loss={summary['final_eval_loss']:.4f} (first {summary['first_eval_loss']:.4f}, "
                    f"floor {summary['loss_floor']:.4f}); results in {out}", highlight=False)


def cmd_analyze(args) -> int:
    return analysis.report(args.results, console())


def cmd_matrix(args) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} is invalid: expected an integer >= 1 (scenarios run at once)")
    out = Path(args.out)
    runs = matrix.scenarios(run_flags(args), out, seed=args.seed, rounds=args.rounds, only=args.only,
                            echo=args.verbose, batching=args.peer_batching)
    out.mkdir(parents=True, exist_ok=True)
    matrix.run_matrix(runs, args.jobs)
    console().print("=== Analysis ===")
    return cmd_analyze(argparse.Namespace(results=str(out)))


DEFAULT_CLIENT_TIERS = "0,1,1"
SHARD_HELP = "write checkpoints as shards of at most this size (bytes, or e.g. 200KB, 5GB, 5GiB), as save_pretrained does"
BATCHING_HELP = ("train peers of one shape in one batched computation (sim/engine.py): auto where it pays, on "
                 "for every group of two or more, off peer by peer")


def add_mode_flags(command) -> None:
    """How receivers combine and apply payloads; unset, the config's ([matsim] in state.toml)."""
    command.add_argument("--matformer-mean-semantics", choices=MEAN_SEMANTICS,
                         help="each coefficient's mean over the peers that sent it (coeff, matsim's default), the "
                              "sum over contributing peers (peer, Psyche's heterogeneous path), or the mean over "
                              "the peers whose tier covers it (region)")
    command.add_argument("--apply-rule", choices=APPLY_RULES,
                         help="sign-SGD (sign, DisTrO's), plain SGD (sgd) or AdamW with the aggregate as its gradient")
    command.add_argument("--zero-blocks", choices=ZERO_BLOCKS,
                         help="exact-zero top-k coefficients (an all-zero DCT block's): sent nowhere (absent, "
                              "matsim's default) or at their indices as DeMo and Psyche send them (sent: zeros that "
                              "count in the mean, +1 under 1-bit signs)")


def add_run_flags(command) -> None:
    """Psyche's client flags and the config's acceptance, as the testnet and the matrix take them."""
    command.add_argument("--micro-batch-size", type=int,
                         help="Psyche's client flag: split each trainer's batch into ceil(batch / N) micro-batches "
                              "whose gradients accumulate (default: the whole batch at once)")
    command.add_argument("--fault-latency-ms", help="Psyche's network fault: every payload delayed BASE or BASE-JITTER "
                                                    "ms (uniform), e.g. 50 or 50-20, on the simulated clock")
    command.add_argument("--fault-packet-loss", type=float, help="Psyche's network fault: the probability in [0, 1] "
                                                                  "that a payload is lost")
    command.add_argument("--fault-bandwidth-limit", type=int, help="Psyche's network fault: each client's upload in "
                                                                    "bytes per second (a payload's bytes delay it)")
    command.add_argument("--fault-seed", type=int, help="seed of the network faults; client i draws from seed + i "
                                                         "(default: --seed)")
    command.add_argument(STALE_FLAG, action="store_true", dest="accept_stale_config",
                         help="run a config Psyche at HEAD refuses (a stale schema, a failed check); the run "
                              "records each reason")


def mode_flags(args) -> dict:
    return {"mean_semantics": args.matformer_mean_semantics, "apply_rule": args.apply_rule,
            "zero_blocks": args.zero_blocks}





def build_parser() -> Parser:
    parser = Parser(prog="matsim", description="Verification harness for heterogeneous MatFormer training.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    tiers = commands.add_parser("tiers", help="tier table and one training step per tier")
    tiers.add_argument("--config-path", default=DEFAULT_CONFIG, help="config directory or bundled config name")
    tiers.add_argument("--tiers", help="comma-separated tiers (default: 0..3 or the deepest valid)")
    tiers.add_argument("--batch", type=int, default=0, help="sequences per step (default: per-client share)")
    tiers.add_argument("--seed", type=int, default=0)
    tiers.add_argument("--no-step", dest="step", action="store_false", help="table only, no training step")
    tiers.add_argument("--checkpoint", help="start from this checkpoint (prints the MATFORMER CONFIGURATION box)")
    tiers.add_argument("--matformer-load-strategy", default="auto", choices=LOAD_STRATEGIES)
    tiers.set_defaults(run=cmd_tiers)

    export = commands.add_parser("export-tiers", help="write sliced checkpoints with tier metadata")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--tiers", required=True, help="comma-separated tiers, e.g. 1,2")
    export.add_argument("--out", help="directory for the exports (default: beside the checkpoint, where Psyche's "
                                      "client looks: <checkpoint>-tier<t>)")
    export.add_argument("--max-shard-size", help=SHARD_HELP)
    export.set_defaults(run=cmd_export_tiers)

    schema = commands.add_parser("print-schema-hash", help="hash of the tier-0 canonical schema of a checkpoint")
    schema.add_argument("--checkpoint", required=True)
    schema.add_argument("--matformer-tier", type=int, default=0)
    schema.add_argument("--matformer-load-strategy", default="auto", choices=LOAD_STRATEGIES)
    schema.set_defaults(run=cmd_print_schema_hash)

    mem = commands.add_parser("memory", help="measured and analytic memory per tier, with a PNG chart")
    mem.add_argument("--config-path", action="append", help="repeatable (default: test-nanogpt-small, nanogpt-20m-run)")
    mem.add_argument("--tiers", default="0,1,2")
    mem.add_argument("--out", default="results/memory")
    mem.add_argument("--micro-batch-size", type=int, help="estimate a step in Psyche's micro-batches of at most N "
                                                          "sequences (activations of the largest one)")
    mem.set_defaults(run=cmd_memory)

    testnet = commands.add_parser("testnet", help="local testnet (Psyche's flag names)")
    testnet_commands = testnet.add_subparsers(dest="testnet_command", required=True, parser_class=Parser)
    start = testnet_commands.add_parser("start", help="run a local testnet of simulated clients")
    start.add_argument("--headless", action="store_true", help="accepted for Psyche parity (matsim is headless)")
    start.add_argument("--headless-exit-after-secs", type=float, help="end cleanly at the first round boundary after this")
    start.add_argument("--num-clients", type=int)
    start.add_argument("--config-path", default="test-nanogpt-small")
    start.add_argument("--client-matformer-tiers", help=f"one tier per client (default {DEFAULT_CLIENT_TIERS})")
    start.add_argument("--matformer-tier", type=int,
                       help="Psyche's per-client flag: this tier for every client (--num-clients of them)")
    start.add_argument("--data-location",
                       help="dummy (the synthetic source) or PATH (a byte corpus), in place of the config's data; "
                            "the run records the substitution")
    start.add_argument("--model-config", help="a config.json (or a directory holding one) for a model the config "
                                              "names on a hub")
    start.add_argument("--client-matformer-helper-fractions", help="one fraction in [0, 1] per client (helper mode)")
    start.add_argument("--matformer-helper-rotation-interval", type=int,
                       help="rounds per helper rotation epoch (Psyche's client flag; default 4)")
    start.add_argument("--tui", default="false", choices=["true", "false"], help="accepted for Psyche parity")
    start.add_argument("--seed", type=int, default=0)
    start.add_argument("--rounds", type=int, help="default: the config's total_steps")
    start.add_argument("--eval-every", type=int, help="held-out loss every N rounds, and on the last "
                                                      "(default: about 50 points per run)")
    start.add_argument("--faults", help="e.g. drop=0.1,corrupt=0.05 (kinds: drop late duplicate corrupt nan byzantine churn)")
    start.add_argument("--out", help="results directory (default results/testnet)")
    start.add_argument("--backend", default="inprocess", choices=["inprocess", "distributed"],
                       help="distributed: one process per client on torch.distributed's store (CPU); same metrics")
    start.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    start.add_argument("--peer-batching", default="auto", choices=BATCHING, help=BATCHING_HELP)
    start.add_argument("--checkpoint-every", type=int,
                       help="also save OUT/checkpoint every N rounds (it is always saved after the last round)")
    start.add_argument("--init-checkpoint", help="start every client from this checkpoint, loaded at its tier "
                                                 "(auto strategy)")
    start.add_argument("--max-shard-size", help=SHARD_HELP)
    start.add_argument("--client-checkpoint-dir", help="Psyche's flag: also keep the run's checkpoints as "
                                                       "DIR/step-N (every --checkpoint-every rounds, and the last)")
    start.add_argument("--client-keep-steps", type=int, default=3, help="checkpoint steps kept in "
                                                                         "--client-checkpoint-dir (Psyche's default 3)")
    add_mode_flags(start)
    add_run_flags(start)
    start.set_defaults(run=cmd_testnet)

    analyze = commands.add_parser("analyze", help="table, PASS/FAIL criteria and loss-curve PNG of a results directory")
    analyze.add_argument("results", nargs="?", default="results")
    analyze.set_defaults(run=cmd_analyze)

    matrix = commands.add_parser("matrix", help="the chapter's scenario matrix and its analysis (make run runs the "
                                                "chapter's unit tests first)")
    matrix.add_argument("--config-path", default=MATRIX_CONFIG)
    matrix.add_argument("--rounds", type=int)
    matrix.add_argument("--seed", type=int, default=0)
    matrix.add_argument("--out", default="results")
    matrix.add_argument("--verbose", action="store_true", help="print every round's log line")
    matrix.add_argument("--jobs", type=int, help="scenarios run at once, one process each (default: every core)")
    matrix.add_argument("--only", help="comma-separated scenario names (default: all of them)")
    matrix.add_argument("--peer-batching", default="auto", choices=BATCHING, help=BATCHING_HELP)
    add_mode_flags(matrix)
    add_run_flags(matrix)
    matrix.set_defaults(run=cmd_matrix)

    vec = commands.add_parser("vectors", help="conformance vectors: export matsim's cases, check an implementation")
    vec_commands = vec.add_subparsers(dest="vectors_command", required=True)
    export = vec_commands.add_parser("export", help="write the cases (vectors/FORMAT.md) to a directory")
    export.add_argument("--out", required=True)
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--cases-per-op", type=int, default=16)
    export.set_defaults(run=cmd_vectors_export)
    check = vec_commands.add_parser("check", help="run an implementation over the cases (line-delimited JSON)")
    check.add_argument("directory")
    check.add_argument("--impl", required=True, help='the implementation\'s command, e.g. "python -m sim.conformance"')
    check.add_argument("--only", help="one op")
    check.add_argument("--fail-fast", action="store_true")
    check.add_argument("--timeout", type=float, default=30.0, help="seconds per case (default 30)")
    check.add_argument("--report", help="JSON report (default DIRECTORY.report.json beside the directory)")
    check.add_argument("--reading", default="matsim", help="what psyche_divergent cases expect: matsim (default) or "
                                                           "psyche (Psyche's known behaviour)")
    check.set_defaults(run=cmd_vectors_check)

    fuzzing = commands.add_parser("fuzz", help="property-based differential fuzzing of an implementation through "
                                               "the vectors' protocol")
    fuzzing.add_argument("--impl", required=True, help='the implementation\'s command, e.g. "python -m sim.conformance"')
    fuzzing.add_argument("--ops", help="comma-separated ops (default: every op the implementation lists)")
    fuzzing.add_argument("--seconds", type=float, default=60.0, help="seconds of fuzzing per op (default 60)")
    fuzzing.add_argument("--reading", default="matsim", help="compare with matsim's outputs (default) or, where "
                                                             "Psyche's code reads an op otherwise, with Psyche's")
    fuzzing.add_argument("--seed", type=int, default=0)
    fuzzing.add_argument("--timeout", type=float, default=30.0, help="seconds an answer may take (default 30)")
    fuzzing.add_argument("--out", default="results/fuzz-impl", help="where found cases and report.json go")
    fuzzing.add_argument("--db", default=".hypothesis/fuzz-impl", help="Hypothesis's example database, one per op: "
                                                                       "what was found is tried first next time")
    fuzzing.set_defaults(run=cmd_fuzz)
    return parser


def cmd_fuzz(args) -> int:
    from sim import fuzz
    ops = args.ops.split(",") if args.ops else None
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout} is invalid: expected seconds > 0")
    reports = fuzz.fuzz(args.impl, ops, args.seconds, args.reading, args.seed, args.out, args.db,
                        echo=lambda line: console().print(line, highlight=False, markup=False), timeout_s=args.timeout)
    table = Table("op", "tried", "unsupported", "passed", "mismatches", "errors", "first mismatch", "seconds",
                  title=f"matsim fuzz --impl {args.impl}")
    for r in reports:
        first = "-" if r.first_mismatch_s is None else f"{r.first_mismatch_s:.1f} s"
        table.add_row(r.op, str(r.tried), str(r.unsupported), str(r.passed), str(r.mismatches), str(r.errors), first,
                      r.skipped or f"{r.seconds:.0f}")
    console().print(table)
    console().print(f"report: {Path(args.out) / 'report.json'}", highlight=False)
    return 1 if any(r.mismatches or r.errors for r in reports) else 0


def cmd_vectors_export(args) -> None:
    start = time.perf_counter()
    out = vectors.export(args.out, args.seed, args.cases_per_op)
    size = sum(f.stat().st_size for f in out.iterdir())
    console().print(f"wrote {out}: {len(list(out.glob('*.json'))) - 1} ops, {size / 2**20:.1f} MiB in "
                    f"{time.perf_counter() - start:.1f} s", highlight=False)


def cmd_vectors_check(args) -> int:
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout} is invalid: expected seconds > 0")
    results = vectors.check(args.directory, args.impl, args.only, args.fail_fast, args.timeout, reading=args.reading)
    by_op: dict[str, Counter] = {}
    for result in results:
        by_op.setdefault(result.op, Counter())[result.status] += 1
        by_op[result.op]["other"] += result.other_reading
    other = "psyche" if args.reading == "matsim" else "matsim"
    table = Table("op", "cases", "pass", "fail", f"of which {other}'s reading", "error", "unsupported", "skipped",
                  "verdict")
    for op, counts in sorted(by_op.items()):
        bad = counts["fail"] + counts["error"]
        total = sum(counts[s] for s in ("pass", "fail", "error", "unsupported", "skipped"))
        verdict = ("FAIL" if bad else "skipped" if counts["skipped"] == total
                   else "unsupported" if counts["unsupported"] == total else "PASS")
        table.add_row(op, str(total), str(counts["pass"]), str(counts["fail"]), str(counts["other"]),
                      str(counts["error"]), str(counts["unsupported"]), str(counts["skipped"]), verdict)
    console().print(table)
    for result in results:
        if result.status in ("fail", "error"):
            console().print(f"{result.status.upper()} {result.case}: {result.reason}", highlight=False, markup=False)
    report = Path(args.report) if args.report else Path(str(Path(args.directory).resolve()) + ".report.json")
    report.write_text(json.dumps({"impl": args.impl, "directory": str(args.directory), "reading": args.reading,
                                  "results": [dataclasses.asdict(r) for r in results]}, indent=1))
    console().print(f"report: {report}", highlight=False)
    return 1 if any(r.status in ("fail", "error") for r in results) else 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args) or 0
    except SimError as err:
        print(f"matsim: error: {err}", file=sys.stderr)
        return 2
