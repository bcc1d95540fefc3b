"""`matsim fuzz --impl CMD`: property-based differential fuzzing of an implementation through
the conformance protocol (vectors/FORMAT.md).

For each op, Hypothesis draws cases as the vectors' own generators describe them
(sim/vectors/cases.py, drawing from Hypothesis instead of a seeded generator: integers and
choices shrink toward their first values, tensors toward zero with a few small values), computes
matsim's answer (or Psyche's reading, `--reading psyche`), writes the case's tensors where the
implementation reads them, asks it, and compares within the case's tolerance. A mismatch is
shrunk to a minimal case, which is written out as a one-case vectors directory flagged `found`
that `matsim vectors check` replays, and printed with both answers, their difference and the
replay command. Hypothesis's example database (one per op) is kept under `--db`, so a mismatch
found once is tried first next time.

An answer `unsupported` is counted apart; an implementation that crashes, hangs, prints
garbage or exits mid-run is diagnosed in one line naming the case, which is kept as found; the
implementation is restarted and the next op goes on.
"""
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from sim.conformance import OPS, encode, error_kind
from sim.errors import SimError
from sim.vectors.adapter import Adapter, AdapterTrouble
from sim.vectors.cases import CASES, FLOAT_OPS, READINGS
from sim.vectors.check import READINGS_NAMES, compare, same_top_k
from sim.vectors.store import EXACT, FLOAT, VectorsError, write_cases

MAX_SET = 32   # (position, value) pairs a drawn tensor sets at most


def value_strategy():
    """Values a reader checks by hand first: small integers, then a few floats of other scales."""
    from hypothesis import strategies as st
    return (st.integers(-3, 3).filter(bool).map(float) | st.sampled_from([0.5, -0.25, 1e-3])
            | st.floats(-8, 8, allow_nan=False, allow_infinity=False, width=32).filter(bool))


def value_vectors(n: int, dtype=torch.float32, base: float = 0.0, values=None):
    """n values that shrink toward what fits in a failure report: `base` everywhere but a drawn
    set of (position, value) pairs. Shrinking leaves fewer pairs, earlier positions and small
    integers: a counterexample reads as a few numbers, not as a seed."""
    from hypothesis import strategies as st
    values = value_strategy() if values is None else values

    def placed(pairs):
        x = torch.full((n,), base, dtype=dtype)
        for i, v in pairs:
            x[i] = v
        return x
    return st.lists(st.tuples(st.integers(0, max(n - 1, 0)), values), max_size=min(n, MAX_SET),
                    unique_by=lambda pair: pair[0]).map(placed)


class HypothesisDraws:
    """What the vectors' generators draw from (`sim.vectors.cases.Draws`), drawn by Hypothesis."""

    def __init__(self, data):
        self.data = data

    def randn(self, *shape) -> torch.Tensor:
        return self.data.draw(value_vectors(math.prod(shape))).view(*shape) if shape else torch.tensor(0.0)

    def int(self, low: int, high: int) -> int:
        from hypothesis import strategies as st
        return self.data.draw(st.integers(low, high))

    def choice(self, options):
        from hypothesis import strategies as st
        return self.data.draw(st.sampled_from(list(options)))

    def permutation(self, n: int) -> torch.Tensor:
        from hypothesis import strategies as st
        return torch.tensor(self.data.draw(st.permutations(range(n))), dtype=torch.int64)


@dataclass
class OpReport:
    op: str
    tried: int = 0
    unsupported: int = 0
    passed: int = 0
    mismatches: int = 0
    errors: int = 0
    skipped: str = ""                 # why the op was not fuzzed
    seconds: float = 0.0
    first_mismatch_s: float | None = None
    tried_to_first_mismatch: int | None = None   # cases asked until the first mismatch, it included
    found: list = field(default_factory=list)   # {"directory", "reason", "size", ...} of each found case


class _Stop(BaseException):
    """Ends an op's fuzzing at once: not an Exception, so Hypothesis passes it through unshrunk."""


class Mismatch(AssertionError):
    """An answer that is not matsim's (or Psyche's): what Hypothesis shrinks."""


def tolerance_of(op: str) -> dict:
    return FLOAT if op in FLOAT_OPS else EXACT


def expected_of(op: str, made: tuple, reading: str) -> dict:
    """{"outputs"} or {"error"} matsim computes for a case (under `reading`, Psyche's where it
    reads the op otherwise), and whether that is Psyche's reading."""
    inputs, flags, _, *psyche_inputs = made
    try:
        if reading == "psyche" and psyche_inputs:
            return {"outputs": READINGS.get(op, OPS[op])(psyche_inputs[0])}
        return {"outputs": OPS[op](inputs)}
    except SimError as err:
        return {"error": error_kind(err)}


def judge(expected: dict, reply: dict, tolerance: dict, op: str = "", flags=(), inputs=None) -> str | None:
    """Why an answer is not the expected one, or None (a compress answer on a tie case: by its
    values, as `vectors check` reads it)."""
    if "error" in expected:
        kind = (reply.get("error") or {}).get("kind") if isinstance(reply.get("error"), dict) else None
        return None if kind == expected["error"] else f"expected error {expected['error']}, got {kind or 'outputs'}"
    if "error" in reply:
        return f"unexpected error {str(reply['error'])[:120]}"
    why = compare(expected["outputs"], reply.get("outputs"), tolerance, "outputs")
    if why and op == "compress" and "tie" in flags and same_top_k(expected["outputs"], reply.get("outputs"), tolerance,
                                                                  inputs):
        return None
    return why


def size_of(inputs) -> tuple[int, int]:
    """(non-zero tensor elements, peers) of a case's inputs: how small a found case is."""
    elements, peers = 0, 0
    if isinstance(inputs, torch.Tensor):
        return int(torch.count_nonzero(inputs)) if inputs.dtype != torch.uint8 else inputs.numel(), 0
    if isinstance(inputs, dict):
        for key, value in inputs.items():
            e, p = size_of(value)
            elements, peers = elements + e, peers + p
            if key in ("payloads", "frames") and isinstance(value, list):
                peers += len(value)
    elif isinstance(inputs, (list, tuple)):
        for value in inputs:
            e, p = size_of(value)
            elements, peers = elements + e, peers + p
    return elements, peers


def fuzz_op(adapter: Adapter, op: str, scratch: Path, out: Path, *, seconds: float, reading: str, seed: int,
            database: Path, command: str, report: OpReport, echo=print) -> None:
    """Fuzz one op for `seconds`, shrinking the first mismatch Hypothesis finds."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.database import DirectoryBasedExampleDatabase

    tolerance, started, counter = tolerance_of(op), time.monotonic(), iter(range(10**12))
    last: dict = {}

    @settings(database=DirectoryBasedExampleDatabase(str(database / op)), max_examples=10**9, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.reuse, Phase.generate, Phase.shrink],
              report_multiple_bugs=False)
    @given(st.data())
    def case(data):
        index = data.draw(st.integers(0, 2**16), label="index")   # chooses a variant (index % k): 0 first
        made = CASES[op](HypothesisDraws(data), index)
        if time.monotonic() - started > seconds and not last.get("failing"):
            raise _Stop()   # the budget is spent (past it, only a shrink in progress goes on)
        expected = expected_of(op, made, reading)
        name = f"{op}-fuzz-{next(counter):06d}"
        # Psyche's reading starts from the pairs Psyche would have sent, where the case has them.
        asked = made[3] if reading == "psyche" and len(made) > 3 else made[0]
        inputs = _stored_inputs(asked, name, scratch)
        try:
            reply = adapter.ask({"id": name, "op": op, "inputs": inputs})
        except AdapterTrouble as trouble:   # kept as found as it is: a crash or a hang is not shrunk
            adapter.restart()
            last.update(broken=True, made=made, index=index, expected=None, reply=None, why=f"{name}: {trouble}")
            raise _Stop() from None
        if reply.get("id") != name:
            adapter.restart()
            last.update(broken=True, made=made, index=index, expected=None, reply=reply,
                        why=f"{name}: answer for {reply.get('id')!r}")
            raise _Stop()
        report.tried += 1
        if "unsupported" in reply:
            report.unsupported += 1
            return
        why = judge(expected, reply, tolerance, op, made[1], asked)
        if why is None:
            report.passed += 1
            return
        if report.first_mismatch_s is None:
            report.first_mismatch_s, report.tried_to_first_mismatch = time.monotonic() - started, report.tried
        last.update(failing=True, made=made, index=index, expected=expected, reply=reply, why=why)
        raise Mismatch(why)

    # Hypothesis draws its seed from the global random module: seeded so, a run repeats itself
    # and still keeps its example database (an explicit @seed would switch the database off).
    random.seed(f"{seed}/{op}")
    try:
        case()
    except Mismatch:
        report.mismatches += 1
        report.found.append(_found(op, last, out, command, reading, echo))
    except _Stop:
        pass
    finally:
        report.seconds = time.monotonic() - started
    if last.get("broken"):
        report.errors += 1
        report.found.append(_found(op, last, out, command, reading, echo))


def _stored_inputs(inputs, name: str, scratch: Path):
    """The case's inputs as the protocol sends them, its tensors written to their own file in
    `scratch` (an implementation caches files by name: one name per case)."""
    tensors: dict = {}

    def refer(value, path):
        if isinstance(value, torch.Tensor):
            key = f"{name}/{path}"
            tensors[key] = value.contiguous()
            return {"tensor": {"file": f"{name}.safetensors", "key": key}}
        if isinstance(value, dict):
            return {k: refer(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [refer(v, f"{path}/{i}") for i, v in enumerate(value)]
        return value
    stored = refer(inputs, "in")
    (scratch / f"{name}.safetensors").write_bytes(safetensors.torch.save(tensors))
    return stored


def _found(op: str, last: dict, out: Path, command: str, reading: str, echo) -> dict:
    """Write the shrunk case as a one-case vectors directory flagged `found`, print it, and
    return its row."""
    inputs, flags, strategy, *psyche = last["made"]
    digest = hashlib.sha256(json.dumps(encode(inputs), sort_keys=True, default=str).encode()).hexdigest()[:10]
    directory = out / f"{op}-{digest}"
    made = (inputs, [*flags, "found"], f"matsim fuzz, shrunk: {last['why'][:120]}", *psyche)
    write_cases(directory, {op: [made]}, seed=0)
    elements, peers = size_of(inputs)
    shown = json.dumps(encode(inputs), default=str)
    echo(f"FOUND {op}: {last['why']}")
    echo(f"  minimal input ({elements} non-zero elements, {peers} peers): {shown[:600]}{'...' if len(shown) > 600 else ''}")
    if last.get("expected") is not None:
        echo(f"  matsim's answer ({reading} reading): {json.dumps(encode(last['expected']), default=str)[:400]}")
        echo(f"  the implementation's: {json.dumps(last['reply'], default=str)[:400]}")
    replay = f"matsim vectors check {directory} --impl {json.dumps(command)}" + (
        " --reading psyche" if reading == "psyche" else "")
    echo(f"  replay: {replay}")
    return {"directory": str(directory), "reason": last["why"], "elements": elements, "peers": peers,
            "index": last["index"], "replay": replay}


def fuzz(command: str, ops: list[str] | None, seconds: float, reading: str, seed: int, out: str | Path,
         database: str | Path, echo=print, timeout_s: float = 30.0) -> list[OpReport]:
    """Fuzz `command` on each op (every op it lists, or `ops`), `seconds` each, every answer
    awaited at most `timeout_s`."""
    if reading not in READINGS_NAMES:
        raise VectorsError(f"--reading {reading!r} is unknown: valid are {', '.join(READINGS_NAMES)}")
    if seconds <= 0:
        raise VectorsError(f"--seconds {seconds:g} is invalid: expected seconds > 0")
    unknown = sorted(set(ops or ()) - set(CASES))
    if unknown:
        raise VectorsError(f"--ops names unknown ops {unknown}: valid are {', '.join(sorted(CASES))}")
    out, database = Path(out), Path(database)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="matsim-fuzz-"))
    reports = []
    try:
        adapter = Adapter(command, scratch, timeout_s=timeout_s)
        try:
            for op in ops or sorted(CASES):
                report = OpReport(op)
                reports.append(report)
                if op not in adapter.ops:
                    report.skipped = "the implementation does not list it"
                    continue
                fuzz_op(adapter, op, scratch, out, seconds=seconds, reading=reading, seed=seed, database=database,
                        command=command, report=report, echo=echo)
                for file in scratch.glob("*.safetensors"):   # the cases of this op are answered
                    file.unlink()
        finally:
            adapter.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (out / "report.json").write_text(json.dumps({"impl": command, "reading": reading, "seed": seed,
                                                  "seconds_per_op": seconds,
                                                  "ops": [r.__dict__ for r in reports]}, indent=1))
    return reports


def counts(reports: list[OpReport]) -> Counter:
    return Counter({"mismatches": sum(r.mismatches for r in reports), "errors": sum(r.errors for r in reports)})
