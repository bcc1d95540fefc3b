"""A vectors directory (vectors/FORMAT.md): `export` writes one, deterministically (manifest.json,
and per op <op>.json and <op>.safetensors), `load` reads one back, its files checked first."""
import json
import shutil
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sim.conformance import FORMAT, OPS, VERSION, error_kind
from sim.errors import SimError
from sim.vectors.cases import CASES, FLOAT_OPS, NAMES, NEAR_MISSES, READINGS, Draws, _killers, _pinned_alignments

MANIFEST = "manifest.json"
EXACT = {"rtol": 0.0, "atol": 0.0}
FLOAT = {"rtol": 1e-5, "atol": 1e-6}   # float32 inputs; another implementation's DCT may round differently


class VectorsError(SimError):
    """A vectors directory or an implementation's command that cannot be used at all."""


def _stored(value, case_id: str, path: str, tensors: dict):
    """`value` with every tensor moved into `tensors` and replaced by its reference."""
    if isinstance(value, torch.Tensor):
        key = f"{case_id}/{path}"
        tensors[key] = value.detach().contiguous().clone()
        return {"tensor": {"key": key}}
    if isinstance(value, dict):
        return {k: _stored(v, case_id, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stored(v, case_id, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _with_file(value, file: str):
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            return {"tensor": {"file": file, "key": value["tensor"]["key"]}}
        return {k: _with_file(v, file) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_file(v, file) for v in value]
    return value


def _same(a, b, tolerance: dict) -> bool:
    """Whether two readings' outputs agree as `check` compares an answer (floats within `tolerance`)."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.shape == b.shape):
            return False
        return (torch.allclose(a.double(), b.double(), rtol=tolerance["rtol"], atol=tolerance["atol"], equal_nan=True)
                if a.dtype.is_floating_point else torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], tolerance) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y, tolerance) for x, y in zip(a, b))
    return a == b


def _case(case_id: str, op: str, made: tuple, seed: int, index: int, tensors: dict) -> dict:
    """One case: matsim's outputs (or error) for its inputs and, where Psyche's reading of the
    same data differs, Psyche's outputs too (flag psyche_divergent), with the inputs Psyche's
    reading starts from where Psyche would have sent other pairs (an all-zero block's zeros
    at real indices, libtorch's choice among ties)."""
    inputs, flags, strategy, *psyche_inputs = made
    flags, file = set(flags), f"{op}.safetensors"
    try:
        outputs = OPS[op](inputs)
        expected = {"outputs": _stored(outputs, case_id, "out", tensors)}
    except SimError as err:
        outputs, expected = None, {"error": error_kind(err)}
        flags.add("invalid")
    if outputs is not None and psyche_inputs:
        psyche = READINGS.get(op, OPS[op])(psyche_inputs[0])
        if not _same(outputs, psyche, FLOAT if op in FLOAT_OPS else EXACT):
            expected["psyche"] = {"outputs": _stored(psyche, case_id, "psyche", tensors)}
            if not _same(inputs, psyche_inputs[0], EXACT):   # Psyche would have sent other pairs: its own inputs
                expected["psyche"]["inputs"] = _stored(psyche_inputs[0], case_id, "psyche_in", tensors)
            flags.add("psyche_divergent")
    return {"id": case_id, "op": op, "inputs": _with_file(_stored(inputs, case_id, "in", tensors), file),
            "expected": _with_file(expected, file), "tolerance": FLOAT if op in FLOAT_OPS else EXACT,
            "flags": sorted(flags), "made": {"strategy": strategy, "seed": seed, "index": index}}


def export(out: str | Path, seed: int = 0, cases_per_op: int = 16) -> Path:
    """Write the vectors to `out`, atomically (staged beside it, then renamed)."""
    if cases_per_op < 1:
        raise VectorsError(f"--cases-per-op {cases_per_op} is invalid: expected an integer >= 1")
    pinned, killers, entries = _pinned_alignments(), _killers(), {}
    for op, make in CASES.items():
        count = max(cases_per_op, len(NAMES) + len(NEAR_MISSES)) if op == "prefix_dim" else cases_per_op
        entries[op] = [(f"{op}-{index:04d}", make(Draws(seed, op, index), index), index) for index in range(count)]
        for kind, extra in (("pinned", pinned), ("kills", killers)):
            entries[op] += [(f"{op}-{kind}-{index:02d}", made, index)
                            for index, (_, *made) in enumerate(c for c in extra if c[0] == op)]
    return _write(Path(out), seed, cases_per_op, entries)


def write_cases(out: str | Path, cases: dict[str, list[tuple]], seed: int = 0) -> Path:
    """A vectors directory of the given cases ({op: [(inputs, flags, strategy[, Psyche's
    inputs])]}): `matsim fuzz` writes each case it finds as one."""
    entries = {op: [(f"{op}-found-{i:02d}", made, i) for i, made in enumerate(made_cases)]
               for op, made_cases in cases.items()}
    return _write(Path(out), seed, None, entries)


def _write(out: Path, seed: int, cases_per_op: int | None, entries: dict[str, list[tuple]]) -> Path:
    """The files of {op: [(case id, made, index)]} at `out`, staged beside it and renamed in."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest = {"format": FORMAT, "version": VERSION, "seed": seed, "cases_per_op": cases_per_op, "ops": {}}
    for op, items in entries.items():
        tensors = {}
        cases = [_case(case_id, op, made, seed, index, tensors) for case_id, made, index in items]
        (staging / f"{op}.safetensors").write_bytes(safetensors.torch.save(dict(sorted(tensors.items()))))
        (staging / f"{op}.json").write_text(json.dumps({"op": op, "cases": cases}, indent=1, sort_keys=True) + "\n")
        manifest["ops"][op] = {"file": f"{op}.json", "tensors": f"{op}.safetensors", "cases": len(cases)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


# --- reading ----------------------------------------------------------------------

def load(directory: str | Path, only: str | None = None) -> list[dict]:
    """Every case of a vectors directory (of op `only`), its files checked first."""
    return _load(Path(directory), only)[0]


def _load(directory: Path, only: str | None) -> tuple[list[dict], dict]:
    """(the cases, their safetensors files by name as `resolve` caches them): each file is
    read once, to check it and to serve every case that refers to it."""
    if not (directory / MANIFEST).is_file():
        raise VectorsError(f"vectors directory {str(directory)!r} has no {MANIFEST}: give a directory that "
                           f"`matsim vectors export` wrote")
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VectorsError(f"{directory / MANIFEST} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise VectorsError(f"{directory / MANIFEST}: format {manifest.get('format')!r} version "
                           f"{manifest.get('version')!r} is not supported: this matsim reads {FORMAT} version {VERSION}")
    ops = manifest.get("ops", {})
    if only is not None and only not in ops:
        raise VectorsError(f"--only {only!r} is not an op of {directory}: valid are {', '.join(sorted(ops))}")
    cases, tensors = [], {}
    for op, entry in sorted(ops.items()):
        if only is not None and op != only:
            continue
        try:
            tensors[entry["tensors"]] = safetensors.torch.load_file(directory / entry["tensors"])
            cases += json.loads((directory / entry["file"]).read_text())["cases"]
        except (OSError, ValueError, KeyError, safetensors.SafetensorError) as err:
            raise VectorsError(f"{directory}: the files of op {op!r} cannot be read ({type(err).__name__}: {err})"
                               ) from None
    return cases, tensors


