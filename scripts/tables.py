#!/usr/bin/env python
"""Every generated table of README.md and docs/ from the measurement file a script wrote
(docs/data/*.json, each stamped with the commit that produced it by sim/provenance.py).

A page marks a table with a pair of comments naming it:

    <!-- table: power-detection -->
    ...(generated: never edit by hand)...
    <!-- /table: power-detection -->

    .venv/bin/python -m scripts.tables            # rewrite every marked table from its file
    .venv/bin/python -m scripts.tables --check    # exit 1 naming each table that differs (tests/test_tables.py)

Each table ends with the line that says where its figures come from: the script and
arguments, the commit (with "+ uncommitted changes" when the checkout was dirty), the
machine and the date.
"""
import argparse
import json
import re
import sys
from pathlib import Path

from scripts import CHECKOUT

DATA = CHECKOUT / "docs" / "data"
PAGES = ("README.md", "docs/**/*.md")
MARKED = re.compile(r"(<!-- table: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /table: (?P=name) -->)", re.S)


def load(name: str) -> dict:
    path = DATA / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"tables: docs/data/{path.name} is missing: run the script that writes it")
    return json.loads(path.read_text())


def source(data: dict, command: str) -> str:
    """The provenance line under a table."""
    stamp = data.get("provenance", data)
    commit = stamp.get("commit")
    if not commit:
        raise SystemExit(f"tables: the measurement of `{command}` names no commit")
    machine = stamp.get("machine", {})
    where = f"{machine.get('cores')} cores, torch {machine.get('torch')}" + (f", {machine['gpu']}" if machine.get("gpu") else "")
    dirty = " + uncommitted changes" if stamp.get("dirty") else ""
    return f"<sub>`{command}` at {commit[:10]}{dirty}; {where}; {stamp.get('date', '')[:10]}.</sub>"


def rows(header: list[str], body: list[list]) -> str:
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *map(line, body)])


def pct(x: float, signed: bool = False) -> str:
    return f"{x:+.1%}" if signed else f"{x:.0%}"


# --- the tables ----------------------------------------------------------------------------

def power_detection() -> str:
    d = load("power")
    names = ("chapter", "paired gap", "learning", "any")
    body = []
    for bug, row in sorted(d["detection"].items()):
        mark = lambda c: " \\*" if row["past_tolerance"][c] else ""
        body.append([bug, f"{row['effect']['paired gap']:+.4f}{mark('paired gap')}",
                     f"{row['effect']['learning']:.4f}{mark('learning')}", *(pct(row["rates"][n]) for n in names)])
    fa = d["false_alarms"]
    body.append([f"*none (correct code, seeds {d['seeds']['calibration'][0]}-{d['seeds']['calibration'][1]}, leave-one-out)*",
                 f"{d['paired']['mean']:+.4f}", f"{d['learning']['mean']:.4f}", *(f"{fa[n]}/{fa['seeds']}" for n in names)])
    table = rows(["planted bug", "mean paired gap", "mean floor gap of the oracle", "chapter 15%", "paired gap",
                  "learning", "any"], body)
    caught = [b for b, r in d["detection"].items() if r["rates"]["any"] == 1.0]
    missed = [b for b, r in d["detection"].items() if r["rates"]["any"] == 0.0]
    text = (f"\\* the bug moves the mean past that criterion's tolerance (it must be caught 95% of the time). "
            f"Bands on correct code: paired gap {d['paired']['mean']:+.2%} ± {d['paired']['sd']:.2%} (bound "
            f"{d['paired_bound']:+.2%}, tolerance {d['paired_tolerance']:.2%}); learning {d['learning']['mean']:.2%} "
            f"± {d['learning']['sd']:.2%} above the floor (bound {d['learning_bound']:.2%}, tolerance "
            f"{d['learning_tolerance']:.2%}). False alarms: {fa['any']} of {fa['seeds']} correct seeds "
            f"({fa['any'] / fa['seeds']:.1%}). Caught on every detection seed: {len(caught)} of {len(d['detection'])} "
            f"bugs; on none: {len(missed)}" + (f" ({', '.join(sorted(missed))})" if missed else "") + ". "
            f"{d['runs']} runs, {d['cpu_seconds'] / 3600:.1f} CPU hours.")
    return table + "\n\n" + text + "\n\n" + source(d, f"python -m scripts.power --calibrate {fa['seeds']} --write")


def power_runs() -> str:
    d = load("power")
    floor = d["floor"]
    body = [["oracle 0,0,0 (tier 0 homogeneous)", f"{d['oracle_final']:.4f} ± {d['oracle_final_sd']:.4f}",
             pct(d["oracle_final"] / floor - 1, True)],
            ["0,1,1", f"{d['hetero_final']:.4f} ± {d['hetero_final_sd']:.4f}", pct(d["hetero_final"] / floor - 1, True)],
            ["no-suffix baseline 2,2,2", f"{d['baseline_final']:.4f} ± {d['baseline_final_sd']:.4f}",
             pct(d["baseline_final"] / floor - 1, True)]]
    text = (f"Floor {floor:.4f} nats, {d['rounds']} rounds of {d['config']}. The no-suffix baseline ends "
            f"{d['baseline_minus_oracle']:.3f} nats above the oracle: {d['baseline_sigmas_raw']:.1f} standard deviations "
            f"of the oracle's final loss over seeds, {d['baseline_sigmas_paired']:.1f} of the paired difference.")
    return (rows(["run", "final loss, mean ± sd over seeds", "vs floor"], body) + "\n\n" + text + "\n\n"
            + source(d, "python -m scripts.power --write"))


def fault_gap() -> str:
    d = load("fault_gap")
    body = [["cases fitted", d["fit"]["cases"]], ["largest gap per round's worth of payloads lost", f"{d['fit']['largest_gap_per_round']:.4f}"],
            ["bound (x margin " + f"{d['margin']})", f"{d['bound']['per_round']:.4f}"],
            ["fresh cases judged", d["test"]["cases"]], ["false alarms", f"{d['test']['false_alarms']} ({d['test']['false_alarm_rate']:.1%})"]]
    return rows(["whole-run bound", "value"], body) + "\n\n" + source(d, "python -m scripts.calibrate_faults")


def round_off() -> str:
    d = load("round_off")
    body = [[mode, row["cases"], row["aggregates"], f"{row['max']:.2g}", f"{row['p99']:.2g}",
             f"{d['bounds'][mode.split('/')[1]]:.0e}"] for mode, row in sorted(d["measured"].items())]
    return (rows(["mode / dtype", "cases", "aggregates", "error / scale, max", "p99", "bound"], body) + "\n\n"
            + source(d, f"python -m scripts.round_off --examples {d['examples']}"))


def shrink() -> str:
    before, after = load("shrink_before"), load("shrink_after")
    body = []
    for bug in sorted(set(before["bugs"]) | set(after["bugs"])):
        cell = lambda rep: (f"{rep['bugs'][bug]['nonzero']} ({rep['bugs'][bug]['largest']['shape']})"
                            if bug in rep["bugs"] and rep["bugs"][bug]["caught"] else "-")
        body.append([bug, cell(before), cell(after)])
    body.append(["*median*", before["median_nonzero"], after["median_nonzero"]])
    return (rows(["planted bug", "before: non-zero elements (largest tensor)", "after"], body) + "\n\n"
            + "before: " + source(before, "python -m scripts.shrink_report") + "<br>after: "
            + source(after, "python -m scripts.shrink_report"))


def bug_paths() -> str:
    before, after = load("bug_paths_before"), load("bug_paths")
    def live(rep, bug):
        """(default, off): y where the default run changes wherever batching off does (or, for a
        bug of the batched path alone, anywhere); the scenarios it changes in brackets."""
        if bug not in rep["bugs"]:
            return "-", "-"
        auto, off = rep["bugs"][bug]["default"], rep["bugs"][bug]["off"]
        default = bool(auto) and set(off) <= set(auto)
        return (f"{'y' if default else '**n**'} ({auto or '-'})", f"{'y' if off else 'n'} ({off or '-'})")
    quiet = sorted(b for b, r in after["bugs"].items() if not r["default"] and not r["off"])   # modes A-C lack
    body = [[bug, *live(before, bug), *live(after, bug)]
            for bug in sorted(set(before["bugs"]) | set(after["bugs"])) if bug not in quiet]
    return (rows(["planted bug", "before: default run", "before: batching off", "after: default run",
                  "after: batching off"], body) + "\n\n"
            + "Scenarios (tiny, 6 rounds): A clipping, weight decay, batch ramp, cold start, helpers, late/drop/churn "
            + "under SGD; B 1-bit with sent zeros under sign-SGD; C mixed tiers under SGD. A bug lives in the default "
            + "path when the default (auto-batched) run changes wherever the batching-off run does. Left out: "
            + ", ".join(f"`{b}`" for b in quiet) + " (modes these scenarios do not use: AdamW joins, chunk 8, "
            + "rounds with no payload, helper rotation, two faults on a peer; the exact reference's property "
            + "draws them).\n\n"
            + "before: " + source(before, "python -m scripts.bug_paths --checkout OLD") + "<br>after: "
            + source(after, "python -m scripts.bug_paths"))


def psyche_configs() -> str:
    d = load("psyche_configs")
    body = [[r["file"], r["kind"] or "-", r["psyche"], ("ran: " if r["ran"] else "") + r["result"].replace("|", "\\|"),
             ", ".join(f"`{k} {v}`" for k, v in r["overrides"].items()) or "none"] for r in d["files"]]
    return (rows(["file", "kind", "Psyche at HEAD", "matsim", "overrides"], body) + "\n\n"
            + source(d, f"python -m scripts.psyche_configs PSYCHE_CHECKOUT (Psyche at {str(d.get('psyche_commit'))[:10]})"))


def zero_blocks() -> str:
    d = load("zero_blocks")
    name = {"absent": "absent (matsim's default)", "sent": "sent (Psyche, 1-bit)"}
    body = [[name[m], f"{r['mean_moved']:.4f}", f"{r['max_moved']:.4f}", pct(r["moved_share"]), f"{r['final_loss']:.4f}"]
            for m, r in sorted(d["modes"].items())]
    text = (f"{d['rounds']} rounds; tokens {d['seen']}-{d['vocab'] - 1} never occur; their rows start at a mean "
            f"\\|w\\| of {d['modes']['sent']['initial_scale']:.4f}.")
    return (rows(["zero blocks", "unseen rows: mean \\|moved\\|", "max \\|moved\\|", "elements moved", "final loss"], body)
            + "\n\n" + text + "\n\n" + source(d, f"python -m scripts.zero_blocks --rounds {d['rounds']}"))


def matrix() -> str:
    d = load("matrix")
    number = lambda value, spec: "-" if value is None else format(value, spec)
    body = [[r["scenario"], r["tiers"], r["helpers"], f"{r['final_loss']:.4f}", f"{r['floor']:.4f}",
             number(r["oracle"], ".4f"), number(r["no_suffix"], ".4f"), number(r["vs_oracle"], "+.1%"),
             number(r["suffix_share"], ".0%"), "PASS" if r["passed"] else "FAIL"] for r in d["rows"]]
    return (rows(["scenario", "tiers", "helpers", "final loss", "floor", "oracle", "no-suffix", "vs oracle",
                  "suffix share", "verdict"], body) + "\n\n" + source(d, "make run"))


def memory() -> str:
    d = load("memory")
    mib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
    measured, by_config = [], {}
    for r in d["measured"]:
        by_config.setdefault(r["config"], []).append(r)
    for config, tiers in by_config.items():
        base = tiers[0]
        for r in tiers:
            measured.append([config, r["tier"], r["device"], mib(r["peak_bytes"]),
                             pct(r["peak_bytes"] / base["peak_bytes"] - 1, True), mib(r["analytic_bytes"]),
                             pct(r["analytic_bytes"] / base["analytic_bytes"] - 1, True)])
    analytic, base = [], {}
    for r in d["analytic"]:
        base.setdefault(r["model"], r["total"])
        analytic.append([r["model"], r["tokens"], r["tier"], mib(r["parameters"]), mib(r["gradients"]),
                         mib(r["distro_state"]), mib(r["activations"]), mib(r["total"]),
                         pct(r["total"] / base[r["model"]] - 1, True)])
    return ("Measured, one training step per tier:\n\n"
            + rows(["config", "tier", "device", "peak", "vs tier 0", "analytic", "analytic vs tier 0"], measured)
            + "\n\nAnalytic, fp32:\n\n"
            + rows(["model", "tokens", "tier", "parameters", "gradients", "DisTrO state", "activations", "total",
                    "vs tier 0"], analytic) + "\n\n" + source(d, "matsim memory --tiers 0,1,2"))


def reference_modes() -> str:
    from tests.planted_bugs import BUGS, CATCHERS, REFERENCE_MODES
    d = load("planted_bugs")
    body = [[BUGS[bug][0], bug, ", ".join(f"`{c.split('::')[-1]}`" for c in CATCHERS[bug]),
             f"{d['seconds_to_detection'][bug]:.1f}" if bug in d["seconds_to_detection"] else "not caught"]
            for bug in REFERENCE_MODES]
    return (rows(["the dimension's bug", "planted bug", "caught by", "seconds to detection"], body) + "\n\n"
            + source(d, f"make test (profile {d['profile']}, {d.get('workers')} workers)"))


def planted_bugs() -> str:
    from tests.planted_bugs import BUGS, CATCHERS
    d = load("planted_bugs")
    seconds = d["seconds_to_detection"]
    body = [[bug, BUGS[bug][0], ", ".join(f"`{c.split('::')[-1]}`" for c in CATCHERS[bug]),
             f"{seconds[bug]:.2f}" if bug in seconds else "not caught"] for bug in sorted(BUGS)]
    caught = [s for b, s in seconds.items() if b in BUGS]
    return (rows(["planted bug", "what it does", "caught by", "seconds to detection"], body) + "\n\n"
            + f"{len(caught)} of {len(BUGS)} caught; median {d['median_seconds']:.2f} s, slowest {max(caught):.1f} s."
            + "\n\n" + source(d, f"make test (profile {d['profile']}, {d.get('workers')} workers)"))


def mutation() -> str:
    d = load("mutation")
    c = d["counts"]
    body = [[state, n] for state, n in sorted(c.items())]
    return (rows(["mutants", "count"], body) + "\n\n"
            + f"Score {d['score']:.1%}: {c.get('killed', 0)} killed of {c.get('killed', 0) + c.get('survived', 0)} "
            + f"killed or survived. Survivors: {', '.join(f'`{n}`' for n in d['survivors'][:40]) or 'none'}"
            + (f" and {len(d['survivors']) - 40} more" if len(d["survivors"]) > 40 else "") + ".\n\n"
            + source(d, "scripts/mutation_score.sh"))


def fuzz_vs_random() -> str:
    d = load("fuzz_vs_random")
    cov, det = d["coverage_summary"], d["detection_summary"]
    examples = {e: [r[e]["examples"] for r in d["coverage"]] for e in ("random", "hypofuzz")}
    median = lambda xs: sorted(xs)[len(xs) // 2]
    coverage = rows([f"coverage, {cov['targets']} targets x {d['seconds']:g} s each", "random", "HypoFuzz"], [
        ["examples run (total; median per target)", *(f"{sum(examples[e]):,}; {median(examples[e])}" for e in ("random", "hypofuzz"))],
        ["line transitions reached in sim/ (sum over targets)", *(f"{cov['total'][e]:,}" for e in ("random", "hypofuzz"))],
        ["targets where it reached more", cov["more_for"]["random"], cov["more_for"]["hypofuzz"]],
        ["failures on the honest code", *(sum(r[e]["found_at"] is not None for r in d["coverage"]) for e in ("random", "hypofuzz"))]])
    first = {e: sum(1 for r in d["detection"] if r[e] is not None and (r[o] is None or r[e] < r[o]))
             for e, o in (("random", "hypofuzz"), ("hypofuzz", "random"))}
    slowest = {e: max((r[e] for r in d["detection"] if r[e] is not None), default=None) for e in ("random", "hypofuzz")}
    n = len(d["detection"])
    detection = rows([f"detection, {n} planted bugs one at a time, budget {d['detect_seconds']:g} s", "random", "HypoFuzz"], [
        ["found", *(f"{det[e]['found']} of {n}" for e in ("random", "hypofuzz"))],
        ["median seconds to detection", *(f"{det[e]['median_s']:.2f}" for e in ("random", "hypofuzz"))],
        ["slowest", *(f"{slowest[e]:.2f}" for e in ("random", "hypofuzz"))],
        ["bugs it found first", first["random"], first["hypofuzz"]]])
    return (coverage + "\n\n" + detection + "\n\n"
            + source(d, f"python -m scripts.fuzz_vs_random --seconds {d['seconds']:g} --detect {d['detect_seconds']:g}"))


def bandwidth() -> str:
    d = load("bandwidth")
    n0, n1 = d["tier0"], d["tier1"]
    body = [[m["model"], f"{m['params'] / 1e6:,.1f}M", pct(m["mlp_share"]), f"{m['tier0_bytes']:,} B",
             f"{m['tier1_bytes']:,} B", f"{m['dense_fp32_bytes'] / m['tier0_bytes']:.0f}x smaller",
             pct(m["mixed_round_bytes"] / m["tier0_round_bytes"] - 1, True)] for m in d["models"]]
    return (rows(["model", "params", "MLP share", "tier-0 payload", "tier-1 payload", "vs dense fp32",
                  f"{n0}xT0+{n1}xT1 vs {n0 + n1}xT0"], body) + "\n\n"
            + source(d, f"python -m scripts.bandwidth (top-{d['topk']} of {d['chunk']}x{d['chunk']} blocks)"))


def cli() -> str:
    """Every matsim command and its options, from the parser itself (not a measurement)."""
    import argparse as ap

    from sim.cli import build_parser

    def commands(parser, prefix):
        for action in parser._actions:   # argparse has no public walk over subcommands
            if isinstance(action, ap._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    yield from commands(sub, f"{prefix} {name}") if any(
                        isinstance(a, ap._SubParsersAction) for a in sub._actions) else [(f"{prefix} {name}", helps.get(name), sub)]
    out = []
    for name, help_, parser in commands(build_parser(), "matsim"):
        body = []
        for action in parser._actions:
            if isinstance(action, ap._HelpAction):
                continue
            flag = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest.upper()}`"
            choices = f" ({', '.join(map(str, action.choices))})" if action.choices else ""
            flags_only = isinstance(action, (ap._StoreTrueAction, ap._StoreFalseAction, ap._StoreConstAction))
            default = ("" if action.default is None or action.default is ap.SUPPRESS or action.required or flags_only
                       else f"`{action.default}`")
            what = (action.help or "").replace("|", "\\|").replace("%%", "%").replace("<", "&lt;").replace(">", "&gt;")
            body.append([flag, (what + choices).strip(), default])
        out.append(f"### `{name}`\n\n{help_ or ''}\n\n" + rows(["option", "what", "default"], body))
    return "\n\n".join(out) + "\n\n<sub>Generated from `sim/cli.py`'s parser by `python -m scripts.tables`.</sub>"


def findings() -> str:
    from scripts.findings import FINDINGS
    d = load("findings")["findings"]
    out = []
    for name, f in FINDINGS.items():
        figures = d.get(name)
        measured = f.summary(figures) if figures else "not measured yet (run its command)"
        command = f"python -m scripts.findings {name}" + (" --psyche CHECKOUT" if f.needs_psyche else "")
        out.append(f"## {f.title}\n\n- **What Psyche does:** {f.psyche}\n- **What it should do:** {f.expected}\n"
                   f"- **Measured:** {measured}" + (" It still holds." if figures and figures["holds"] else "") + "\n"
                   f"- **Reproduce:** `{command}`\n\n" + (source(figures, command) if figures else ""))
    return "\n\n".join(out)


def bench() -> str:
    d = load("bench")
    by_name = {b["name"]: b for b in d["benchmarks"]}
    goals = [("batched over serial round, tiny, 64 peers at tiers 0,1,2 (goal: at least 5x)",
              "test_bench_batched_round_over_serial[tiny-0,1,2 x64]", "serial_over_batched"),
             ("harness overhead, tiny: a round over bare peers, interleaved (goal: at most 1.10)",
              "test_bench_harness_overhead_interleaved[tiny]", "round_over_bare"),
             ("harness overhead, test-nanogpt-small, interleaved (goal: at most 1.10)",
              "test_bench_harness_overhead_interleaved[test-nanogpt-small]", "round_over_bare")]
    headline = rows(["goal", "measured"], [[label, f"{by_name[name]['extra'][key]:.2f}x" if name in by_name else "not run"]
                                           for label, name, key in goals])
    within = [[b["group"], b["name"].split("[")[-1].rstrip("]"), f"{b['extra'][k]:.2f}x"]
              for b in d["benchmarks"] for k in ("serial_over_batched", "round_over_bare", "ratio") if k in b["extra"]]
    against = [[b["group"], b["name"].removeprefix("test_bench_"), b["baseline"].removeprefix("test_bench_"),
                f"{b['median_s'] * 1e3:.2f} ms", f"{b['over_baseline']:.2f}x"]
               for b in d["benchmarks"] if b["over_baseline"] is not None]
    rates = [[b["group"], b["name"].removeprefix("test_bench_"), f"{b['extra'][k]:,.1f}"]
             for b in d["benchmarks"] for k in ("examples_per_second", "rounds_per_second") if k in b["extra"]]
    return ("\n\n".join([
        headline,
        "Ratios measured inside one benchmark (pairs timed together, the median over pairs; peak RSS batched over serial):",
        rows(["group", "case", "ratio"], within),
        "Against the group's bare baseline, from the medians of the same run:",
        rows(["group", "benchmark", "baseline", "median", "ratio"], against),
        "Rates (the property benchmarks against drawing the same examples and doing nothing):",
        rows(["group", "benchmark", "per second"], rates)])
        + "\n\n" + source(d, "python -m scripts.bench_report" + (f" -k {d['selection']}" if d.get("selection") else "")))


def fuzz_power() -> str:
    d = load("fuzz_power")
    body = [[bug, r["op"], "missed" if r["first_mismatch_s"] is None else f"{r['first_mismatch_s']:.2f}",
             r["tried"] if r["tried"] is not None else "-",
             "-" if r["shrunk_elements"] is None else f"{r['shrunk_elements']} / {r['shrunk_peers']}",
             f"{r['killer_elements']} / {r['killer_peers']}"] for bug, r in sorted(d["rows"].items())]
    return (rows(["planted bug", "op", "seconds to the first mismatch", "cases tried", "shrunk: elements / peers",
                  "killing case: elements / peers"], body) + "\n\n"
            + f"Found {d['found']} of {d['bugs']} within {d['seconds']:g} s each; median {d['median_s']:.2f} s.\n\n"
            + source(d, f"python -m scripts.fuzz_power --seconds {d['seconds']:g}"))


def fuzz_impl() -> str:
    d = load("fuzz_impl")
    out = []
    for name, run in sorted(d["runs"].items()):
        body = [[r["op"], r["tried"], r["unsupported"], r["passed"], r["mismatches"], r["errors"],
                 f"{r['seconds']:.0f}" if not r.get("skipped") else "skipped"] for r in run["ops"]]
        out.append(f"**{name}** (`--reading {run['reading']}`, {run['seconds_per_op']:g} s per op):\n\n"
                   + rows(["op", "tried", "unsupported", "passed", "mismatches", "errors", "seconds"], body))
    found = [[name, f["op"], f["elements"], f["peers"], f["reason"][:90].replace("|", "\\|")]
             for name, run in sorted(d["runs"].items()) for f in run["found"]]
    if found:
        out.append("Found, shrunk (each replays with `matsim vectors check` on its directory):\n\n"
                   + rows(["implementation", "op", "non-zero elements", "peers", "mismatch"], found))
    return "\n\n".join(out) + "\n\n" + source(d, "python -m scripts.fuzz_impl")


def stress() -> str:
    d = load("stress")
    body = [[r["scenario"], r["tiers"], r["rounds"], f"{r['final_loss']:.4f}", f"{r['homogeneous']:.4f}",
             pct(r["gap"], True), r["lost"], r["late"], r["churn"], "PASS" if r["passed"] else "FAIL"] for r in d["rows"]]
    return (rows(["scenario", "tiers", "rounds completed", "final loss", "homogeneous", "vs homogeneous",
                  "payloads lost", "payloads late", "clients churned", "verdict"], body) + "\n\n"
            + source(d, f"CONFIG_PATH={d['config']} ROUNDS={d['rounds']} SEED={d['seed']} python -m scripts.stress all --write"))


def fuzz_reach() -> str:
    d = load("fuzz_reach")
    props = d["properties"]
    swept = sum(p["sweep"] == "passed" for p in props)
    fuzzed = [p["examples"] for p in props]
    reached = sum(p["sweep"] == "passed" or p["examples"] > 0 for p in props)
    median = sorted(fuzzed)[len(fuzzed) // 2]
    body = [["properties", len(props)], ["with at least one example (sweep or HypoFuzz)", reached],
            ["passed the sweep's random examples", swept], ["reached by HypoFuzz", sum(e > 0 for e in fuzzed)],
            ["HypoFuzz examples: total / median per property", f"{sum(fuzzed):,} / {median}"],
            ["failures", sum(p["failures"] > 0 for p in props) + sum(p["sweep"] == "failed" for p in props)]]
    return rows(["make fuzz", "count"], body) + "\n\n" + source(d, f"make fuzz (FUZZ_SECONDS={d.get('seconds', '?')})")


TABLES = {
    "power-detection": power_detection, "power-runs": power_runs, "fault-gap": fault_gap, "round-off": round_off,
    "shrink": shrink, "bug-paths": bug_paths, "psyche-configs": psyche_configs, "zero-blocks": zero_blocks,
    "matrix": matrix, "memory": memory, "reference-modes": reference_modes, "planted-bugs": planted_bugs,
    "mutation": mutation, "fuzz-vs-random": fuzz_vs_random,
    "bandwidth": bandwidth, "cli": cli, "findings": findings, "bench": bench,
    "fuzz-power": fuzz_power, "fuzz-impl": fuzz_impl, "stress": stress,
    "fuzz-reach": fuzz_reach,
}


def pages() -> list[Path]:
    return sorted({p for pattern in PAGES for p in CHECKOUT.glob(pattern)})


def regenerate(text: str, where: str) -> str:
    def fill(match):
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"tables: {where} marks an unknown table {name!r}; known: {', '.join(sorted(TABLES))}")
        return match[1] + TABLES[name]() + "\n" + match[4]
    return MARKED.sub(fill, text)


def stale() -> list[str]:
    """The pages whose tables differ from their files."""
    return [str(p.relative_to(CHECKOUT)) for p in pages() if regenerate(p.read_text(), p.name) != p.read_text()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its file")
    args = parser.parse_args(argv)
    if args.check:
        differ = stale()
        for page in differ:
            print(f"{page}: a table differs from its measurement file (python -m scripts.tables rewrites it)")
        return 1 if differ else 0
    for page in pages():
        text = page.read_text()
        new = regenerate(text, page.name)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(CHECKOUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
