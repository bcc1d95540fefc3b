"""Replay a property failure from its JSON record, in a checkout (the suite is not part of
the installed package):

    scripts/reproduce.sh results/failures/<test>.json     # = python -m properties.reproduce RECORD

The record (written by properties/records.py when a property fails) names the
test and carries Hypothesis's blob of the shrunk example. Replaying runs that
one test under pytest, on CPU, with $MATSIM_REPRODUCE pointing at the record,
so exactly that example runs; a planted bug named in the record is planted
again. Exit status as pytest's for that test: 1 when the failure reproduces,
0 when the test passes on that example now (the bug is fixed), 2 when the record is bad.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from sim.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parent.parent
FIELDS = ("test", "blob", "hypothesis_version")


def load_record(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"failure record {str(path)!r} does not exist: records are written under results/failures/ "
                          f"when a property fails")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"failure record {str(path)!r} is not valid JSON ({err})") from None
    missing = [f for f in FIELDS if not isinstance(record, dict) or f not in record]
    if missing:
        raise ConfigError(f"failure record {str(path)!r} lacks {', '.join(missing)}: expected a record written by "
                          f"the property suite, with fields {', '.join(FIELDS)}")
    return record


def reproduce(path: str | Path) -> int:
    record = load_record(path)
    env = {**os.environ, "MATSIM_REPRODUCE": str(Path(path).resolve()), "CUDA_VISIBLE_DEVICES": "",
           "MATSIM_FAILURES": str(Path(path).resolve().parent / "replayed")}
    env.pop("MATSIM_PLANT", None)
    if record.get("planted_bug"):
        env["MATSIM_PLANT"] = record["planted_bug"]
    command = [sys.executable, "-m", "pytest", record["test"], "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
               "--no-header"]
    print(f"replaying {record['test']}" + (f" with planted bug {record['planted_bug']}" if record.get("planted_bug") else ""),
          flush=True)
    run = subprocess.run(command, cwd=CHECKOUT, env=env, capture_output=True, text=True)
    output = run.stdout + run.stderr
    if run.returncode not in (0, 1):
        raise ConfigError(f"could not run {record['test']} (pytest exit {run.returncode}): "
                          f"{output.strip().splitlines()[-1] if output.strip() else 'no output'}")
    if run.returncode == 0 or "DidNotReproduce" in output:
        print(f"did not reproduce: {record['test']} passes on the recorded example now")
        return 0
    print(output.rstrip())
    print(f"reproduced: {record['test']} fails on the recorded example")
    return 1


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m properties.reproduce RECORD (a results/failures/*.json file)", file=sys.stderr)
        return 2
    try:
        return reproduce(args[0])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
