"""`matsim vectors check`: every case of a directory through an implementation, each answer
compared with the case's expected outputs within its tolerance."""
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sim.conformance import resolve
from sim.distro import ChunkGrid
from sim.vectors.adapter import Adapter, AdapterTrouble
from sim.vectors.store import VectorsError, _load


def same_top_k(expected: dict, got: dict, tolerance: dict, inputs: dict) -> bool:
    """A compress answer on a `tie` case: another valid top-k, block by block the same values
    up to which of equal magnitudes were kept (FORMAT.md: read a tie case by its values), and
    the same pairs in the absent slot (an all-zero block's zeros are not a tie to settle)."""
    absent = ChunkGrid.of(tuple(inputs["x"].shape), inputs["chunk"]).block_numel
    try:
        want, where = expected["values"].double(), expected["indices"]
        actual = torch.tensor(got["values"]["data"], dtype=torch.float64).reshape(want.shape)
        at = torch.tensor(got["indices"]["data"], dtype=torch.int64).reshape(where.shape)
    except (KeyError, TypeError, ValueError, RuntimeError):
        return False
    sort = lambda v: v.abs().sort(dim=-1).values
    return (torch.equal((at == absent).sum(-1), (where == absent).sum(-1))
            and torch.allclose(sort(actual), sort(want), rtol=tolerance["rtol"], atol=tolerance["atol"]))


def compare(expected, got, tolerance: dict, path: str = "") -> str | None:
    """Why `got` is not `expected` within `tolerance`, or None when it is."""
    if isinstance(expected, torch.Tensor):
        if not (isinstance(got, dict) and {"shape", "data"} <= set(got)):
            return f"{path}: expected a tensor, got {str(got)[:60]}"
        if list(got["shape"]) != list(expected.shape) or len(got["data"]) != expected.numel():
            return f"{path}: shape {got['shape']}, expected {list(expected.shape)}"
        try:
            actual = torch.tensor(got["data"], dtype=torch.float64).reshape(expected.shape)
        except (TypeError, ValueError, RuntimeError):
            return f"{path}: data is not a list of numbers"
        want = expected.double()
        if expected.dtype.is_floating_point:
            if not torch.allclose(actual, want, rtol=tolerance["rtol"], atol=tolerance["atol"], equal_nan=True):
                worst = (actual - want).abs().max().item()
                return f"{path}: off by up to {worst:.3g} (rtol {tolerance['rtol']:g}, atol {tolerance['atol']:g})"
        elif not torch.equal(actual, want):
            return f"{path}: {int((actual != want).sum())} of {want.numel()} integers differ"
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return f"{path}: keys {sorted(got) if isinstance(got, dict) else type(got).__name__}, expected {sorted(expected)}"
        for key in expected:
            why = compare(expected[key], got[key], tolerance, f"{path}/{key}")
            if why:
                return why
        return None
    if isinstance(expected, float):
        ok = isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=tolerance["rtol"],
                                                            abs_tol=tolerance["atol"])
        return None if ok else f"{path}: {got!r}, expected {expected!r}"
    return None if got == expected else f"{path}: {str(got)[:60]}, expected {str(expected)[:60]}"


@dataclass
class Result:
    case: str
    op: str
    status: str   # pass, fail, error (the adapter misbehaved), unsupported (it said so), skipped (op not listed)
    reason: str = ""
    flags: list = field(default_factory=list)
    other_reading: bool = False   # a psyche_divergent case failed, and the answer is the other reading's


READINGS_NAMES = ("matsim", "psyche")


def check(directory: str | Path, command: str, only: str | None = None, fail_fast: bool = False,
          timeout_s: float = 30.0, on_result: Callable[[Result], None] | None = None,
          reading: str = "matsim") -> list[Result]:
    """Every case of `directory` (of op `only`) run by the implementation `command`; a
    psyche_divergent case expects `reading`'s outputs."""
    if reading not in READINGS_NAMES:
        raise VectorsError(f"--reading {reading!r} is unknown: valid are {', '.join(READINGS_NAMES)}")
    directory = Path(directory)
    cases, tensors = _load(directory, only)
    adapter, results = Adapter(command, directory, timeout_s), []
    try:
        for case in cases:
            result = run_case(adapter, case, directory, tensors, reading)
            results.append(result)
            if on_result:
                on_result(result)
            if fail_fast and result.status in ("fail", "error"):
                break
            if result.status == "error":   # its output is out of step (or it is gone): start it afresh
                adapter.restart()
    finally:
        adapter.stop()
    return results


def run_case(adapter: Adapter, case: dict, directory: Path, tensors: dict | None = None,
             reading: str = "matsim") -> Result:
    """One case through `adapter`; `tensors` caches the vectors' safetensors files by name. A
    psyche_divergent case is held to `reading`; a failure that is the other reading says so."""
    op, flags = case["op"], case.get("flags", [])
    if op not in adapter.ops:
        return Result(case["id"], op, "skipped", "op not implemented", flags)
    started = time.perf_counter()
    inputs = case["inputs"]
    if reading == "psyche" and "inputs" in case["expected"].get("psyche", {}):
        inputs = case["expected"]["psyche"]["inputs"]   # the pairs Psyche would have sent
    try:
        reply = adapter.ask({"id": case["id"], "op": op, "inputs": inputs})
    except AdapterTrouble as trouble:
        return Result(case["id"], op, "error", f"{trouble} ({time.perf_counter() - started:.1f} s)", flags)
    if reply.get("id") != case["id"]:
        return Result(case["id"], op, "error", f"answer for {reply.get('id')!r}, expected {case['id']!r}", flags)
    if "unsupported" in reply:   # the implementation says it has no such variant of the op: not a failure
        return Result(case["id"], op, "unsupported", str(reply["unsupported"])[:200], flags)
    expected = resolve(case["expected"], directory, {} if tensors is None else tensors)
    if "error" in expected:
        kind = (reply.get("error") or {}).get("kind") if isinstance(reply.get("error"), dict) else None
        if kind == expected["error"]:
            return Result(case["id"], op, "pass", "", flags)
        return Result(case["id"], op, "fail", f"expected error {expected['error']}, got "
                                              f"{kind or 'outputs'}", flags)
    if "error" in reply:
        return Result(case["id"], op, "fail", f"unexpected error {str(reply['error'])[:100]}", flags)
    readings = {"matsim": expected["outputs"], "psyche": expected.get("psyche", {}).get("outputs")}
    other = "psyche" if reading == "matsim" else "matsim"
    want = readings[reading] if readings[reading] is not None else readings["matsim"]
    why = compare(want, reply.get("outputs"), case["tolerance"], "outputs")
    if why is None or (op == "compress" and "tie" in flags and same_top_k(
            want, reply.get("outputs"), case["tolerance"], resolve(inputs, directory, {} if tensors is None else tensors))):
        return Result(case["id"], op, "pass", "", flags)
    same_inputs = "inputs" not in case["expected"].get("psyche", {})   # else the other reading had other inputs
    if readings["psyche"] is not None and same_inputs and \
            compare(readings[other], reply.get("outputs"), case["tolerance"]) is None:
        return Result(case["id"], op, "fail", f"{why}: the answer is {other}'s reading", flags, other_reading=True)
    return Result(case["id"], op, "fail", why, flags)
