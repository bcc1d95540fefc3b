"""Conformance vectors: matsim's cases as files any implementation can run.

`export` writes a deterministic directory (vectors/FORMAT.md): manifest.json, and per
operation <op>.json (the cases) and <op>.safetensors (their tensors). Inputs are drawn
per case from (seed, op, case index); expected outputs are matsim's (sim/conformance.py),
or the kind of error matsim raises. `check` drives an implementation under test through
the line-delimited JSON protocol of sim/conformance.py, one request per case, each under
a timeout, and compares its answers within each case's tolerance.
"""
import hashlib
import json
import math
import queue
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sim.config import ModelConfig, load_config
from sim.conformance import FORMAT, OPS, VERSION, error_kind, resolve
from sim.distro import ChunkGrid, compress
from sim.errors import SimError
from sim.model import full_shapes, local_shapes

MANIFEST = "manifest.json"
# Waiting for an implementation's hello is a hang guard, not the per-case timeout: starting one
# (an interpreter importing torch, a Rust binary loading libtorch) takes seconds on a busy machine.
STARTUP_S = 120.0
EXACT = {"rtol": 0.0, "atol": 0.0}
FLOAT = {"rtol": 1e-5, "atol": 1e-6}   # float32 inputs; another implementation's DCT may round differently


class VectorsError(SimError):
    """A vectors directory or an implementation's command that cannot be used at all."""


def _generator(seed: int, op: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{op}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _int(g: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _choice(g: torch.Generator, options):
    return options[_int(g, 0, len(options) - 1)]


# --- the cases of each operation ---------------------------------------------------
# Each returns (inputs, flags, strategy) for case `index`; `g` is that case's generator.

LAYER = "model.layers.{}.mlp.{}.{}"
NAMES = [LAYER.format(0, "gate_proj", "weight"), LAYER.format(3, "up_proj", "weight"),
         LAYER.format(1, "down_proj", "weight"), LAYER.format(2, "gate_proj", "bias"), LAYER.format(0, "up_proj", "bias")]
NEAR_MISSES = ["model.layers.0.mlp.down_proj.bias", "model.layers.0.self_attn.down_proj_bias",
               "model.layers.0.mlp.gate_projection.weight", "model.layers.0.mlp.up_proj.weights",
               "model.layers.0.mlp_.up_proj.weight", "model.layers.0.self_attn.o_proj.weight", "model.embed_tokens.weight",
               "lm_head.weight", "mlp.up_proj.weight", "model.layers.0.mlp.up_proj", "", "model.norm.weight"]


def _prefix_dim(g, index):
    names = NAMES + NEAR_MISSES
    name = names[index % len(names)]
    return {"name": name}, ["near_miss"] if name in NEAR_MISSES else [], "real and near-miss parameter names"


def _align_prefix_grad(g, index):
    name = _choice(g, NAMES)
    dim = 1 if "down_proj.weight" in name else 0
    full = _choice(g, [8, 16, 24])
    other = _int(g, 1, 6)
    narrow = full >> _int(g, 0, 2)
    kind = index % 4
    source = [narrow, other] if "weight" in name else [narrow]
    target = [full, other] if "weight" in name else [full]
    if dim == 1:
        source, target = source[::-1], target[::-1]
    flags = []
    if kind == 1:   # slicing: the full gradient brought to a narrow shape
        source, target = target, source
    elif kind == 2:   # a shape that differs off the prefix axis: rejected
        target = list(target)
        if len(target) == 2:
            target[1 - dim] += 1
            flags.append("invalid")
    return {"name": name, "grad": _randn(g, *source), "target_shape": list(target)}, flags, "expand, slice, mismatch"


def _align_sparse_grad(g, index):
    """A helper slab: values of some suffix neurons, scattered into the full shape."""
    name = _choice(g, NAMES[:3])
    dim = 1 if "down_proj" in name else 0
    full, other = _choice(g, [8, 16]), _int(g, 1, 5)
    count = _int(g, 0, full // 2)
    indices = (full - 1 - torch.randperm(full // 2, generator=g)[:count]).sort().values
    flags = []
    if index % 4 == 3 and count:   # a neuron past the full width, or listed twice: refused
        indices = indices.clone()
        indices[-1] = full if index % 8 == 3 else indices[0]
        flags.append("invalid")
    shape = [count, other] if dim == 0 else [other, count]
    target = [full, other] if dim == 0 else [other, full]
    return ({"name": name, "values": _randn(g, *shape), "indices": indices.long(), "target_shape": target}, flags,
            "sorted suffix neurons; out of range or repeated ones")


def _batch_decompress(g, index):
    """Homogeneous payloads of one grid: every peer's pairs, one scatter-mean, one decode."""
    shape, chunk, k = _shape(g), _choice(g, [4, 8]), _int(g, 1, 4)
    payloads = []
    for _ in range(_int(g, 1, 4)):
        sparse = compress(_randn(g, *shape), chunk, k)
        payloads.append({"indices": sparse.indices.long(), "values": sparse.values})
    return {"chunk": chunk, "shape": list(shape), "payloads": payloads}, [], "1-4 peers' top-k of random tensors"


def _chunk_size(g, index):
    n, chunk = _int(g, 1, 5000), _int(g, 1, 128)
    return {"n": n, "chunk": chunk}, ["edge"] if n < chunk or n % chunk else [], "n in [1, 5000], chunk in [1, 128]"


def _shape(g):
    if _int(g, 0, 3) == 0:
        return (_int(g, 1, 40),)
    return (_int(g, 1, 40), _int(g, 1, 40))


def _dct_encode(g, index):
    return {"x": _randn(g, *_shape(g)), "chunk": _choice(g, [4, 8, 16])}, [], "random shapes and chunks"


def _dct_decode(g, index):
    shape, chunk = _shape(g), _choice(g, [4, 8, 16])
    grid = ChunkGrid.of(shape, chunk)
    return ({"coeffs": _randn(g, *grid.blocks, grid.block_numel), "shape": list(shape), "chunk": chunk}, [],
            "random coefficients per block")


def _compress(g, index):
    x, flags = _randn(g, *_shape(g)), []
    if index % 3 == 1:   # some blocks all zero (embedding rows of tokens a batch lacks)
        x.view(-1)[: x.numel() // 2] = 0
        flags.append("absent_slot")
    zero_blocks = "sent" if index % 6 == 1 else "absent"
    if zero_blocks == "sent":
        flags.append("psyche_divergent")
    chunk, topk = _choice(g, [4, 8]), _int(g, 1, 6)
    if _near_tie(x, chunk, topk):
        flags.append("tie")
    return {"x": x, "chunk": chunk, "topk": topk, "zero_blocks": zero_blocks}, flags, "random values, half-zero tensors"


TIE = 1e-4   # relative gap between the k-th and (k+1)-th magnitudes under which another DCT may choose otherwise


def _near_tie(x: torch.Tensor, chunk: int, topk: int) -> bool:
    """Whether some block's k-th and (k+1)-th largest nonzero magnitudes are within TIE: a
    case whose top-k an implementation rounding differently may choose otherwise (flagged)."""
    grid = ChunkGrid.of(tuple(x.shape), chunk)
    if topk >= grid.block_numel:
        return False
    mags = grid.encode(x.double()).abs().sort(dim=-1, descending=True).values
    kth, next_ = mags[..., topk - 1], mags[..., topk]
    return bool(((kth - next_ <= TIE * kth) & (next_ > 0)).any())


def _quantize_1bit(g, index):
    shape, chunk, k = _shape(g), _choice(g, [4, 8]), _int(g, 1, 4)
    x = _randn(g, *shape)
    zero_blocks = "sent" if index % 2 else "absent"
    if index % 4 in (1, 2):
        x.view(-1)[: x.numel() // 2] = 0
    sparse = compress(x, chunk, k, zero_blocks=zero_blocks)
    flags = ["absent_slot"] if bool((sparse.values == 0).any()) else []
    if zero_blocks == "sent" and flags:
        flags.append("psyche_divergent")
    return ({"indices": sparse.indices.long(), "values": sparse.values, "shape": list(shape), "chunk": chunk,
             "zero_blocks": zero_blocks}, flags, "compressed random tensors, some with zero blocks")


def _error_feedback(g, index):
    shape, steps = _shape(g), _int(g, 2, 4)
    return ({"grads": _randn(g, steps, *shape), "lrs": [0.1 * _int(g, 1, 3) for _ in range(steps)],
             "chunk": _choice(g, [4, 8]), "topk": _int(g, 1, 4), "decay": _choice(g, [0.9, 0.999]),
             "quantize_1bit": bool(index % 2), "zero_blocks": "absent"}, [], "a sequence of 2-4 steps")


TINY_NAMES = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "model.norm.weight")


def _aggregate(g, index):
    model = load_config("tiny").model
    chunk, peers, topk = 8, _int(g, 1, 4), _int(g, 1, 4)   # one k for the run, as one config sets it
    semantics = ("coeff", "peer", "region")[index % 3]
    receiver = {name: list(full_shapes(model)[name]) for name in TINY_NAMES}
    payloads, flags = [], ["mixed_tiers"]
    for peer in range(peers):
        tier = _int(g, 0, 2)
        shapes = local_shapes(model, tier)
        params = {}
        for name in TINY_NAMES:
            x = _randn(g, *shapes[name])
            if name.endswith("norm.weight") and _int(g, 0, 2) == 0:
                x.zero_()   # an all-zero block: the absent slot
                flags.append("absent_slot")
            sparse = compress(x, chunk, topk)
            params[name] = {"indices": sparse.indices.long(), "values": sparse.values, "shape": list(shapes[name])}
        payloads.append({"tiers": [tier] * model.num_hidden_layers, "params": params})
    if semantics == "peer":
        flags.append("psyche_divergent")
    return ({"chunk": chunk, "quantized": False, "semantics": semantics, "receiver_shapes": receiver,
             "payloads": payloads}, sorted(set(flags)), "tiny's MLP and a norm, 1-4 peers at tiers 0-2")


def _apply_update(g, index):
    params = {"w": _randn(g, 4, 6), "b": _randn(g, 6)}
    updates = {name: _randn(g, *p.shape) for name, p in params.items()}
    return ({"params": params, "updates": updates, "lr": 0.01 * _int(g, 1, 5), "rule": ("sign", "sgd")[index % 2],
             "weight_decay": _choice(g, [0.0, 0.1])}, [], "sign-SGD and SGD, with and without weight decay")


def _schema_hash(g, index):
    base = load_config("tiny").model
    fields = ["hidden_size", "intermediate_size", "num_hidden_layers", "rope_theta", "rms_norm_eps",
              "max_position_embeddings", "vocab_size", "tie_word_embeddings"]
    changes = {}
    if index % (len(fields) + 1):
        name = fields[index % (len(fields) + 1) - 1]
        value = getattr(base, name)
        changes[name] = (not value) if isinstance(value, bool) else value * 2
    hf = ModelConfig(**{**base.__dict__, **changes}).to_hf_dict()
    return {"config": hf}, [f"changes:{name}" for name in changes], "tiny's config, one hashed field changed"


def _helper_indices(g, index):
    full = _choice(g, [64, 256, 1024])
    width = full >> _int(g, 1, 3)
    return ({"seed": _int(g, 0, 2**31 - 1), "round": _int(g, 0, 40), "layer": _int(g, 0, 7), "width": width,
             "full": full, "fraction": _choice(g, [0.0, 0.1, 0.25, 0.5, 1.0]), "rotation_interval": _int(g, 1, 8)},
            [], "per (seed, layer, epoch)")


CASES: dict[str, Callable] = {"prefix_dim": _prefix_dim, "align_prefix_grad": _align_prefix_grad,
                              "align_sparse_grad": _align_sparse_grad, "batch_decompress": _batch_decompress,
                              "chunk_size": _chunk_size, "dct_encode": _dct_encode, "dct_decode": _dct_decode,
                              "compress": _compress, "quantize_1bit": _quantize_1bit, "error_feedback": _error_feedback,
                              "aggregate": _aggregate, "apply_update": _apply_update, "schema_hash": _schema_hash,
                              "helper_indices": _helper_indices}
# Ops with float outputs, compared within FLOAT (integer outputs, such as indices, always exactly).
FLOAT_OPS = {"dct_encode", "dct_decode", "compress", "quantize_1bit", "error_feedback", "aggregate", "apply_update",
             "align_prefix_grad", "align_sparse_grad", "batch_decompress"}
assert set(CASES) == set(OPS)


# --- export -----------------------------------------------------------------------

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


def export(out: str | Path, seed: int = 0, cases_per_op: int = 16) -> Path:
    """Write the vectors to `out`, atomically (staged beside it, then renamed)."""
    if cases_per_op < 1:
        raise VectorsError(f"--cases-per-op {cases_per_op} is invalid: expected an integer >= 1")
    out = Path(out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest = {"format": FORMAT, "version": VERSION, "seed": seed, "cases_per_op": cases_per_op, "ops": {}}
    for op, make in CASES.items():
        count = max(cases_per_op, len(NAMES) + len(NEAR_MISSES)) if op == "prefix_dim" else cases_per_op
        cases, tensors = [], {}
        for index in range(count):
            case_id = f"{op}-{index:04d}"
            inputs, flags, strategy = make(_generator(seed, op, index), index)
            try:
                expected = {"outputs": _stored(OPS[op](inputs), case_id, "out", tensors)}
            except SimError as err:
                expected = {"error": error_kind(err)}
                flags = sorted(set(flags) | {"invalid"})
            cases.append({"id": case_id, "op": op, "inputs": _with_file(_stored(inputs, case_id, "in", tensors),
                                                                       f"{op}.safetensors"),
                          "expected": _with_file(expected, f"{op}.safetensors"),
                          "tolerance": FLOAT if op in FLOAT_OPS else EXACT, "flags": sorted(set(flags)),
                          "made": {"strategy": strategy, "seed": seed, "index": index}})
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


# --- check ------------------------------------------------------------------------

class AdapterTrouble(Exception):
    """What went wrong with one request: the case fails with this reason."""


class Adapter:
    """The implementation under test, as a subprocess speaking the protocol."""

    def __init__(self, command: str, directory: Path, timeout_s: float):
        self.command, self.directory, self.timeout_s = command, directory, timeout_s
        self.process, self.lines = None, None
        self.ops = self.start()

    def start(self) -> set[str]:
        try:
            argv = shlex.split(self.command)
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except (OSError, ValueError) as err:
            raise VectorsError(f"--impl {self.command!r} cannot be started ({type(err).__name__}: {err})") from None
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True).start()
        try:
            hello = self.ask({"hello": {"format": FORMAT, "version": VERSION, "dir": str(self.directory.resolve())}},
                             max(self.timeout_s, STARTUP_S))
        except AdapterTrouble as trouble:
            self.stop()
            raise VectorsError(f"--impl {self.command!r} did not answer the hello: {trouble}") from None
        return set(hello.get("hello", {}).get("ops", []))

    @staticmethod
    def _read(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)   # end of output: the process exited

    def ask(self, request: dict, timeout_s: float | None = None) -> dict:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise AdapterTrouble(f"the implementation exited (status {self.process.poll()})") from None
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AdapterTrouble(f"no answer within {timeout_s:g} s") from None
        if line is None:
            self.process.wait(timeout=timeout_s)
            raise AdapterTrouble(f"the implementation exited (status {self.process.poll()})")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise AdapterTrouble(f"the answer is not JSON: {line.strip()[:80]!r}") from None
        if not isinstance(reply, dict):
            raise AdapterTrouble(f"the answer is not a JSON object: {line.strip()[:80]!r}")
        return reply

    def restart(self) -> None:
        self.stop()
        self.ops = self.start()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
        if self.process:
            self.process.wait()


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
    status: str           # pass, fail, error (the adapter misbehaved), skipped (op not implemented)
    reason: str = ""
    flags: list = field(default_factory=list)


def check(directory: str | Path, command: str, only: str | None = None, fail_fast: bool = False,
          timeout_s: float = 30.0, on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Every case of `directory` (of op `only`) run by the implementation `command`."""
    directory = Path(directory)
    cases, tensors = _load(directory, only)
    adapter, results = Adapter(command, directory, timeout_s), []
    try:
        for case in cases:
            result = run_case(adapter, case, directory, tensors)
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


def run_case(adapter: Adapter, case: dict, directory: Path, tensors: dict | None = None) -> Result:
    """One case through `adapter`; `tensors` caches the vectors' safetensors files by name."""
    op, flags = case["op"], case.get("flags", [])
    if op not in adapter.ops:
        return Result(case["id"], op, "skipped", "op not implemented", flags)
    started = time.perf_counter()
    try:
        reply = adapter.ask({"id": case["id"], "op": op, "inputs": case["inputs"]})
    except AdapterTrouble as trouble:
        return Result(case["id"], op, "error", f"{trouble} ({time.perf_counter() - started:.1f} s)", flags)
    if reply.get("id") != case["id"]:
        return Result(case["id"], op, "error", f"answer for {reply.get('id')!r}, expected {case['id']!r}", flags)
    expected = resolve(case["expected"], directory, {} if tensors is None else tensors)
    if "error" in expected:
        kind = (reply.get("error") or {}).get("kind") if isinstance(reply.get("error"), dict) else None
        if kind == expected["error"]:
            return Result(case["id"], op, "pass", "", flags)
        return Result(case["id"], op, "fail", f"expected error {expected['error']}, got "
                                              f"{kind or 'outputs'}", flags)
    if "error" in reply:
        return Result(case["id"], op, "fail", f"unexpected error {str(reply['error'])[:100]}", flags)
    why = compare(expected["outputs"], reply.get("outputs"), case["tolerance"], "outputs")
    return Result(case["id"], op, "pass" if why is None else "fail", why or "", flags)
