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
        raise SystemExit(f"tables: {path.relative_to(CHECKOUT)} is missing: run the script that writes it")
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
    body = [[bug, *live(before, bug), *live(after, bug)] for bug in sorted(set(before["bugs"]) | set(after["bugs"]))]
    return (rows(["planted bug", "before: default run", "before: batching off", "after: default run",
                  "after: batching off"], body) + "\n\n"
            + "Scenarios (tiny, 6 rounds): A clipping, weight decay, batch ramp, cold start, helpers, late/drop/churn "
            + "under SGD; B 1-bit with sent zeros under sign-SGD; C mixed tiers under SGD. A bug lives in the default "
            + "path when the default (auto-batched) run changes wherever the batching-off run does.\n\n"
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


TABLES = {
    "power-detection": power_detection, "power-runs": power_runs, "fault-gap": fault_gap, "round-off": round_off,
    "shrink": shrink, "bug-paths": bug_paths, "psyche-configs": psyche_configs, "zero-blocks": zero_blocks,
    "matrix": matrix,
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
