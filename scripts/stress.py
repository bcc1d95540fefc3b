#!/usr/bin/env python
"""The origin's stress scenarios (Psyche's scripts/stress_test.sh), run on matsim's testnet
with Psyche's network-fault flags, every client its own process (the distributed backend),
each ending with the chapter's verdict against the homogeneous run of the same clients:

    basic        no faults
    latency      --fault-latency-ms 50-100
    packet-loss  --fault-packet-loss 0.2
    churn        6 clients at tiers 0,0,1,1,1,1; clients leave and come back (churn=0.1): the
                 leaving client's process is killed and a new one rejoins (Psyche's own local
                 testnet cannot do this headless)
    combined     --fault-latency-ms 30-70 --fault-packet-loss 0.1

    scripts/stress_test.sh SCENARIO                     # as the origin's script (SEED, DURATION, NUM_CLIENTS,
                                                        # CONFIG_PATH, TIERS; ROUNDS caps the run)
    .venv/bin/python -m scripts.stress all --write      # every scenario, published as docs/data/stress.json
"""
import argparse
import json
import os
import sys
from pathlib import Path

from scripts import CHECKOUT
from sim import analyze as analysis
from sim import oracle as criteria
from sim.errors import SimError
from sim.provenance import stamp
from sim.scenario import RunFlags, run_scenario

SCENARIOS = {
    "basic": {},
    "latency": {"latency": "50-100"},
    "packet-loss": {"loss": 0.2},
    "churn": {"clients": 6, "tiers": "0,0,1,1,1,1", "faults": "churn=0.1"},
    "combined": {"latency": "30-70", "loss": 0.1},
}


def run(name: str, spec: dict, env: dict, out: Path, oracle) -> dict:
    clients = spec.get("clients", env["clients"])
    tiers = spec.get("tiers", env["tiers"])
    if len(tiers.split(",")) != clients:
        raise SimError(f"TIERS {tiers} names {len(tiers.split(','))} clients but NUM_CLIENTS is {clients}")
    flags = RunFlags(env["config"], network=(spec.get("latency"), spec.get("loss"), None,
                                             env["seed"] if spec.get("latency") or spec.get("loss") else None))
    meta = run_scenario(flags, tiers, None, out / name, name=name, kind="heterogeneous", oracle=None, seed=env["seed"],
                        rounds=env["rounds"], faults=spec.get("faults"), exit_after=env["duration"],
                        backend="distributed", echo=False)
    result = analysis.load_result(out / name)
    links = [link["fate"] for r in result.records for link in r.get("network", {}).values()]
    judged = analysis.judge({**meta, "kind": "heterogeneous"}, result, oracle, None)
    return {"scenario": name, "tiers": tiers, "rounds": len(result.records), "final_loss": result.final_eval_loss,
            "homogeneous": oracle.final_eval_loss, "gap": criteria.relative_gap(result, oracle),
            "payloads": len(links) or sum(r["contributing_peers"] for r in result.records),
            "lost": links.count("lost"), "late": links.count("late"),
            "stale": sum(r["rejected"].get("stale_round", 0) for r in result.records),
            "churn": sum(r["faults"].get("churn", 0) for r in result.records),
            "criteria": judged, "passed": all(judged.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--out", type=Path, default=CHECKOUT / "results" / "stress")
    parser.add_argument("--write", action="store_true", help="publish the rows as docs/data/stress.json")
    args = parser.parse_args(argv)
    env = {"seed": int(os.environ.get("SEED", 42)), "duration": float(os.environ.get("DURATION", 300)),
           "clients": int(os.environ.get("NUM_CLIENTS", 4)), "config": os.environ.get("CONFIG_PATH", "nanogpt-20m-run"),
           "tiers": os.environ.get("TIERS", "0,1,1,1"),
           "rounds": int(os.environ["ROUNDS"]) if os.environ.get("ROUNDS") else None}
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    rows, oracles = [], {}
    try:
        for name in chosen:
            clients = SCENARIOS[name].get("clients", env["clients"])
            if clients not in oracles:   # the homogeneous run of as many clients, no faults
                label = f"homogeneous-{clients}"
                run_scenario(RunFlags(env["config"]), ",".join(["0"] * clients), None, args.out / label, name=label,
                             kind="baseline", oracle=None, seed=env["seed"], rounds=env["rounds"], faults=None,
                             exit_after=env["duration"], backend="distributed", echo=False)
                oracles[clients] = analysis.load_result(args.out / label)
            row = run(name, SCENARIOS[name], env, args.out, oracles[clients])
            rows.append(row)
            print(f"=== {name}: {row['rounds']} rounds, final loss {row['final_loss']:.4f} vs homogeneous "
                  f"{row['homogeneous']:.4f} ({row['gap']:+.1%}); payloads lost {row['lost']}, late {row['late']}, "
                  f"stale {row['stale']}; churn {row['churn']}")
            for criterion, ok in row["criteria"].items():
                print(f"    {criterion}: {'PASS' if ok else 'FAIL'}")
            print(f"    verdict: {'PASS' if row['passed'] else 'FAIL'}")
    except SimError as err:
        print(f"stress: {err}", file=sys.stderr)
        return 2
    if args.write:
        (CHECKOUT / "docs" / "data" / "stress.json").write_text(json.dumps(
            {**stamp(), **{k: v for k, v in env.items()}, "rows": rows}, indent=2, sort_keys=True) + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
