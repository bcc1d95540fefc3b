#!/usr/bin/env python
"""What matsim found in Psyche (the origin, psyche-elastic), each finding reproduced by one
command that measures it again:

    .venv/bin/python -m scripts.findings                       # every finding, full size
    .venv/bin/python -m scripts.findings one-bit-zeros --smoke # one, at smoke size
    .venv/bin/python -m scripts.findings --psyche CHECKOUT     # the ones that read Psyche's own files

Each finding says what Psyche does (file and function), what it should do or what the
verification chapter says, and how to reproduce it; its reproduction returns the measured
figures and whether the finding holds on them. Full-size runs are written to
docs/data/findings.json with the commit (the findings page is generated from it);
tests/test_findings.py runs every reproduction at smoke size and requires each to hold.
A finding that needs Psyche's files is skipped, saying so, without a checkout
(--psyche or $MATSIM_PSYCHE).
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scripts import CHECKOUT


@dataclass(frozen=True)
class Finding:
    title: str
    psyche: str                       # what Psyche does, and where
    expected: str                     # what it should do, or what the chapter says
    reproduce: Callable[..., dict]    # (smoke, psyche checkout or None) -> figures, with "holds"
    summary: Callable[[dict], str]    # the measured effect, in words, from the figures
    needs_psyche: bool = False
    smoke_shows_it: bool = True       # False: only the full-size run can show it (its smoke run checks the command)


class NeedsPsyche(Exception):
    pass


def psyche_root(given: str | None) -> Path:
    root = given or os.environ.get("MATSIM_PSYCHE")
    if not root or not (Path(root) / "shared").is_dir():
        raise NeedsPsyche("needs a psyche-elastic checkout: --psyche CHECKOUT or $MATSIM_PSYCHE")
    return Path(root)


# --- the reproductions ------------------------------------------------------------------

def peer_mean(smoke: bool, psyche=None) -> dict:
    from scripts.compare_semantics import sign_disagreement
    config, seeds = ("tiny", [0]) if smoke else ("nanogpt-20m-run", [0, 1, 2])
    runs = [sign_disagreement(config, (0, 1, 1), seed) for seed in seeds]
    fractions = [r["fraction"] for r in runs]
    return {"config": config, "tiers": "0,1,1", "seeds": seeds, "fractions": fractions,
            "holds": all(f > 0 for f in fractions)}


def one_bit_zeros(smoke: bool, psyche=None) -> dict:
    from scripts.zero_blocks import SEEN, unseen_rows_moved
    rounds = 5 if smoke else 100
    moved = unseen_rows_moved(rounds)
    return {"rounds": rounds, "seen_tokens": SEEN, **{f"{mode}_mean_moved": row["mean_moved"] for mode, row in moved.items()},
            "initial_scale": moved["sent"]["initial_scale"],
            "holds": moved["absent"]["max_moved"] == 0.0 and moved["sent"]["mean_moved"] > 0.0}


def matformer_test_exchanges_nothing(smoke: bool, psyche=None) -> dict:
    from sim.config import CONFIGS, load_config
    from sim.run import simulate
    state = psyche_root(psyche) / "config" / "matformer-test" / "state.toml"
    run = load_config(state, data_location="dummy", model_config=CONFIGS / "stand-ins" / "llama")
    result = simulate(run, [0, 1], seed=0, rounds=2 if smoke else 3, device="cpu")
    sent = sum(r["bytes_sent"] for r in result.records)
    counted = sum(r["contributing_peers"] for r in result.records)
    return {"optimizer": run.optimizer, "rounds": len(result.records), "bytes_sent": sent, "contributing": counted,
            "replica_max_diff": result.records[-1]["replica_max_diff"],
            "holds": run.optimizer == "AdamW" and sent == 0 and counted == 0}


def configs_fail_schema(smoke: bool, psyche=None) -> dict:
    import tomllib

    from sim.psyche_schema import psyche_verdict
    root = psyche_root(psyche) / "config"
    verdicts = {}
    for path in sorted(root.rglob("*.toml")):
        if path.name == "data.toml":   # a data server's config (DataServerInfo), not a run config
            continue
        table = tomllib.loads(path.read_text())
        verdict = psyche_verdict(table)
        if verdict.layout in ("state", "solana"):
            verdicts[str(path.relative_to(root))] = list(verdict.refused)
    refused = {name: reasons for name, reasons in verdicts.items() if reasons}
    return {"run_configs": len(verdicts), "refused": refused, "holds": bool(refused)}


def export_script(smoke: bool, psyche=None) -> dict:
    from sim.checkpoint import export_tiers, save_checkpoint
    from sim.config import load_config
    from sim.model import build_model
    script = psyche_root(psyche) / "scripts" / "export_matformer_tiers.py"
    tiny = load_config("tiny").model
    biased = dataclasses.replace(tiny, style="nanogpt", mlp_bias=True, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = save_checkpoint(build_model(biased, 0, seed=0, device="cpu"), tmp / "full")
        (sliced,) = export_tiers(full, [1], out=tmp / "sliced")   # an export: Psyche must refuse it
        refused = subprocess.run([sys.executable, str(script), "--src", str(sliced), "--tiers", "1"],
                                 capture_output=True, text=True)
        left = tmp / "sliced" / f"{sliced.name}-tier1"
        empty_left_behind = refused.returncode != 0 and left.is_dir() and not any(left.iterdir())
        made = subprocess.run([sys.executable, str(script), "--src", str(full), "--tiers", "1"],
                              capture_output=True, text=True)
        from safetensors.torch import load_file
        tensors = load_file(str(tmp / "full-tier1" / "model.safetensors")) if made.returncode == 0 else {}
        weight = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
        bias = weight.replace(".weight", ".bias")
        unsliced_bias = bias in tensors and tensors[bias].shape[0] != tensors[weight].shape[0]
    return {"refused_source_exit": refused.returncode, "empty_folder_left": empty_left_behind,
            "up_proj_weight_rows": int(tensors[weight].shape[0]), "up_proj_bias_length": int(tensors[bias].shape[0]),
            "holds": empty_left_behind and unsliced_bias}


def micro_batch_weighting(smoke: bool, psyche=None) -> dict:
    from sim.config import load_config
    from sim.model import build_model, random_tokens
    from sim.peer import backward
    run = load_config("tiny")
    figures = {}
    for batch, micro in ((5, 2), (6, 3)):   # pieces 2, 2, 1 (uneven) and 2, 2, 2 (even)
        model = build_model(run.model, 0, seed=0, device="cpu", dtype=torch.float64)
        tokens = random_tokens(run.model, batch, run.seq_len + 1, seed=1, device="cpu")
        backward(model, tokens, micro)
        split = {n: p.grad.clone() for n, p in model.named_parameters()}
        backward(model, tokens, None)
        whole = {n: p.grad.clone() for n, p in model.named_parameters()}
        figures[f"{batch}_in_{micro}"] = max(((split[n] - whole[n]).norm() / whole[n].norm()).item()
                                            for n in whole if whole[n].norm() > 0)
    return {"relative_difference": figures,
            "holds": figures["5_in_2"] > 1e-3 and figures["6_in_3"] < 1e-12}


def fault_flags_never_applied(smoke: bool, psyche=None) -> dict:
    """Every Rust file of the checkout outside the fault-injection crate: who builds the faults
    (`fault_config()`) and who injects them (`inject_latency`, `should_drop_packet`,
    `apply_bandwidth_limit`, `bandwidth_delay`)."""
    import re
    root = psyche_root(psyche)
    crate = root / "shared" / "network-fault-injection"
    uses = {name: [] for name in ("fault_config", "inject_latency", "should_drop_packet", "apply_bandwidth_limit",
                                  "bandwidth_delay")}
    for path in root.rglob("*.rs"):
        if crate in path.parents or "target" in path.parts:
            continue
        text = path.read_text(errors="replace")
        for name in uses:
            calls = [m for m in re.finditer(rf"\.{name}\s*\(", text)]
            uses[name] += [str(path.relative_to(root))] * len(calls)
    defined = "pub fn fault_config" in (root / "shared" / "client" / "src" / "cli.rs").read_text()
    return {"defined_in_client_cli": defined, "calls": {k: len(v) for k, v in uses.items()},
            "holds": defined and not any(uses.values())}


def twenty_m_gap(smoke: bool, psyche=None) -> dict:
    from sim.config import load_config
    from sim.run import simulate
    config = load_config("nanogpt-20m-chain")
    if smoke:   # the chapter's body at 2 layers and 3 rounds: the run, not the claim
        config = config.replace(model=dataclasses.replace(config.model, num_hidden_layers=2), seq_len=32)
    rounds = 3 if smoke else config.total_steps
    finals = {t: simulate(config, [int(x) for x in t.split(",")], seed=0, rounds=rounds, device="cpu").final_eval_loss
              for t in ("0,0,0", "0,1,1")}
    gap = finals["0,1,1"] / finals["0,0,0"] - 1
    return {"rounds": rounds, "homogeneous": finals["0,0,0"], "heterogeneous": finals["0,1,1"], "gap": gap,
            "holds": gap > 0.15}


FINDINGS = {
    "peer-mean": Finding(
        "Psyche's heterogeneous mean is not batch_decompress's mean",
        "The heterogeneous aggregation (PEER_MEAN in matsim's terms) divides a coefficient that k of N peers sent "
        "by N, the suffix included.",
        "The chapter's checklist asks that the heterogeneous normalization match `batch_decompress` \"mean\": "
        "divide by k, the peers that sent it (COEFF_MEAN).",
        peer_mean,
        lambda f: (f"On {f['config']}, tiers {f['tiers']}, the sign of the applied update differs between the two "
                   f"on {', '.join(f'{x:.2%}' for x in f['fractions'])} of the updated elements (seeds "
                   f"{', '.join(map(str, f['seeds']))}).")),
    "one-bit-zeros": Finding(
        "1-bit packing turns an all-zero DCT block into +1 pushes",
        "DisTrO sends an all-zero block's top-k as zeros, and `quantize_nozeros_tensor_to_boolean_sign` packs the "
        "sign bit, clear for +0.0: every such coefficient arrives as +1.",
        "A block with no gradient should move nothing (matsim's absent slot).",
        one_bit_zeros,
        lambda f: (f"Over {f['rounds']} rounds of tiny where only {f['seen_tokens']} tokens occur, the embedding rows "
                   f"no batch contains move by {f['sent_mean_moved']:.4f} on average under Psyche's packing "
                   f"({f['absent_mean_moved']:.4f} with the absent slot), against an initial scale of "
                   f"{f['initial_scale']:.4f}.")),
    "matformer-test-adamw": Finding(
        "The origin's MatFormer verification config exchanges nothing",
        "config/matformer-test/state.toml uses the AdamW optimizer; Psyche's trainer returns DisTrO results only "
        "for Distro (`optimize_step`'s `Optimizer::Torch` arm), so every client steps its own AdamW alone.",
        "A config that verifies MatFormer aggregation must aggregate: Distro.",
        matformer_test_exchanges_nothing,
        lambda f: (f"{f['rounds']} rounds at tiers 0,1 under {f['optimizer']}: {f['bytes_sent']} bytes sent, "
                   f"{f['contributing']} contributing payloads; the replicas end {f['replica_max_diff']:.3g} apart."),
        needs_psyche=True),
    "configs-fail-schema": Finding(
        "The origin's own configs fail Psyche's schema",
        "`CoordinatorConfig` (shared/coordinator/src/coordinator.rs) requires `epoch_time` and "
        "`CoordinatorConfig::check` refuses a zero `cooldown_time`; run configs written before Psyche's #374 "
        "have neither.",
        "Every config in the repository should load in the code beside it.",
        configs_fail_schema,
        lambda f: (f"{len(f['refused'])} of {f['run_configs']} run configs are refused: "
                   + "; ".join(f"{name} ({', '.join(reasons)})" for name, reasons in sorted(f["refused"].items())) + "."),
        needs_psyche=True),
    "export-script": Finding(
        "Psyche's tier export leaves an empty folder and unsliced MLP biases",
        "scripts/export_matformer_tiers.py creates `<src>-tier<t>` before it checks its source, and slices only "
        "`mlp.{gate,up,down}_proj.weight`.",
        "A refused export writes nothing; every tensor on the FFN axis (the gate and up biases too) is sliced.",
        export_script,
        lambda f: (f"Refusing an already-sliced source (exit {f['refused_source_exit']}) "
                   f"{'left an empty folder behind' if f['empty_folder_left'] else 'left nothing'}; the tier-1 "
                   f"export of a nanogpt model with MLP biases has up_proj.weight with {f['up_proj_weight_rows']} "
                   f"rows and up_proj.bias of {f['up_proj_bias_length']}."),
        needs_psyche=True),
    "micro-batch-weighting": Finding(
        "Uneven micro-batches weigh their sequences unequally",
        "The trainer (shared/modeling/src/trainer.rs) splits a batch into ceil(B / m) pieces with torch's chunk "
        "and divides each piece's mean loss by the number of pieces.",
        "Gradient accumulation should equal the whole batch's gradient: weigh each piece by its share of sequences.",
        micro_batch_weighting,
        lambda f: (f"On tiny in float64, 5 sequences in micro-batches of 2 (pieces 2, 2, 1) give a gradient "
                   f"{f['relative_difference']['5_in_2']:.2%} away from the whole batch's (largest relative "
                   f"difference over parameters); 6 in 3 (even pieces) {f['relative_difference']['6_in_3']:.1e}.")),
    "fault-flags-never-applied": Finding(
        "Psyche's network-fault flags inject nothing",
        "The local testnet passes --fault-latency-ms, --fault-packet-loss, --fault-bandwidth-limit and --fault-seed "
        "to every client, and the client parses them into `fault_config()` (shared/client/src/cli.rs), but no code "
        "calls `fault_config()`, `inject_latency`, `should_drop_packet` or the bandwidth limit: "
        "scripts/stress_test.sh's latency, packet-loss and combined scenarios run without any fault.",
        "The stress scenarios should stress: the client's network path should build the fault config and apply it "
        "to every message it sends (as matsim's testnet does, on a simulated clock).",
        fault_flags_never_applied,
        lambda f: ("Calls outside the fault-injection crate: "
                   + ", ".join(f"`{k}` {v}" for k, v in f["calls"].items()) + "."),
        needs_psyche=True),
    "suffix-gap-at-20m": Finding(
        "At the chapter's 20m body, 0,1,1 misses the 15% criterion",
        "Heterogeneous training as Psyche does it (tier-1 peers send no suffix), on nanogpt-20m-chain's whole "
        "schedule.",
        "The chapter's success criterion: the heterogeneous final loss within 15% of the homogeneous one.",
        twenty_m_gap,
        lambda f: (f"After {f['rounds']} rounds: homogeneous {f['homogeneous']:.4f}, 0,1,1 {f['heterogeneous']:.4f}, "
                   f"{f['gap']:+.1%}."),
        smoke_shows_it=False),
}


def main(argv=None) -> int:
    from sim.provenance import stamp
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids", nargs="*", help=f"which findings (default: all): {', '.join(FINDINGS)}")
    parser.add_argument("--smoke", action="store_true", help="smoke size (what tests/test_findings.py runs)")
    parser.add_argument("--psyche", help="a psyche-elastic checkout (default: $MATSIM_PSYCHE)")
    parser.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "data" / "findings.json",
                        help="where full-size figures go (merged with what is there)")
    args = parser.parse_args(argv)
    unknown = [i for i in args.ids if i not in FINDINGS]
    if unknown:
        parser.error(f"unknown findings {unknown}: valid are {', '.join(FINDINGS)}")
    torch.set_num_threads(1)
    provenance = stamp()   # the checkout as the reproductions import it, before they run
    stored = json.loads(args.out.read_text()) if args.out.is_file() and not args.smoke else {"findings": {}}
    failed = False
    for name in args.ids or FINDINGS:
        finding = FINDINGS[name]
        try:
            figures = finding.reproduce(args.smoke, args.psyche)
        except NeedsPsyche as skip:
            print(f"{name}: skipped: {skip}")
            continue
        failed |= not figures["holds"] and (finding.smoke_shows_it or not args.smoke)
        print(f"{name}: {'holds' if figures['holds'] else 'DOES NOT HOLD'}: {finding.summary(figures)}")
        stored["findings"][name] = {**provenance, "smoke": args.smoke, **figures}
    if not args.smoke:
        args.out.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
