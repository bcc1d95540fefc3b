"""An outside implementation behind the conformance protocol (vectors/FORMAT.md): DeMo's
reference optimizer (bloc97/DeMo, demo.py) for the ops it can express. It imports DeMo's own
file, never `sim`:

    MATSIM_DEMO=/path/to/demo.py matsim vectors check DIR --impl "python vectors/demo_impl/adapter.py"
    MATSIM_DEMO=/path/to/demo.py matsim fuzz --impl "python vectors/demo_impl/adapter.py"

($MATSIM_DEMO may also name a DeMo checkout; demo.py imports einops.) Each op calls DeMo's
code: `_get_smaller_split` for chunk_size, `TransformDCT.encode`/`decode` for the DCT,
`CompressDCT.compress` (torch.topk, sorted=False) for top-k, `CompressDCT.batch_decompress`
(scatter_reduce "mean", no self term) for the mean, and the lines of `DeMo.step` for error
feedback and the sign-SGD apply. What DeMo has no notion of is answered `unsupported`: the
absent slot (DeMo sends an all-zero block's top-k as zeros that count), 1-bit signs,
mixed tiers and the PEER/REGION means, and the SGD and AdamW rules. The only glue is
layout: matsim's pairs are [*blocks, k] with a block's coefficients row-major, DeMo's 2-D
coefficients [y, x, h, w]; a block's pairs go out in ascending index order, as the vectors
fix it (top-k is a set).
"""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_demo():
    given = os.environ.get("MATSIM_DEMO")
    if not given:
        sys.exit("demo adapter: set MATSIM_DEMO to DeMo's demo.py (bloc97/DeMo) or a checkout holding it")
    path = Path(given)
    path = path / "demo.py" if path.is_dir() else path
    if not path.is_file():
        sys.exit(f"demo adapter: MATSIM_DEMO={given} holds no demo.py")
    spec = importlib.util.spec_from_file_location("demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)   # needs einops, as DeMo does
    return module


demo = load_demo()


class Unsupported(Exception):
    """A variant DeMo does not have: answered `unsupported`, counted apart."""


def transform(shape, chunk: int):
    """DeMo's TransformDCT for one tensor shape (it is built from a model's parameters)."""
    return demo.TransformDCT([{"params": [torch.zeros(shape, dtype=torch.float64, requires_grad=True)]}], chunk)


def blocks(shape, chunk: int) -> tuple[list[int], list[int]]:
    block = [demo._get_smaller_split(n, chunk) for n in shape]
    return [n // b for n, b in zip(shape, block)], block


def native(shape, chunk: int) -> tuple:
    """DeMo's coefficient shape of a tensor: [y, x, h, w] for 2-D, [x, w] for 1-D."""
    grid, block = blocks(shape, chunk)
    return (*grid, *block) if len(shape) == 2 else (grid[0], block[0])


def encode(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """matsim's layout [*blocks, numel] of DeMo's coefficients (a block's row-major)."""
    coeffs = transform(list(x.shape), chunk).encode(x.double())
    return coeffs.reshape(*coeffs.shape[:2], -1) if x.dim() == 2 else coeffs


def decode(coeffs: torch.Tensor, shape, chunk: int) -> torch.Tensor:
    return transform(list(shape), chunk).decode(coeffs.double().reshape(native(shape, chunk)))


def in_order(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = indices.argsort(dim=-1, stable=True)
    return indices.gather(-1, order), values.gather(-1, order)


def compress(x: torch.Tensor, chunk: int, topk: int, zero_blocks: str) -> tuple[torch.Tensor, torch.Tensor]:
    coeffs = transform(list(x.shape), chunk).encode(x.double())   # DeMo's own layout: it flattens each block
    indices, values, _, _ = demo.CompressDCT().compress(coeffs, topk)
    if zero_blocks == "absent" and bool((values == 0).any()):
        raise Unsupported("compress with the absent slot: DeMo sends an all-zero block's top-k as zeros")
    return in_order(indices, values)


def mean_of_pairs(indices: list[torch.Tensor], values: list[torch.Tensor], shape, chunk: int) -> torch.Tensor:
    """DeMo's batch_decompress (each coefficient the mean over the pairs naming it), decoded."""
    numel = math.prod(blocks(shape, chunk)[1])
    if any(bool((i >= numel).any()) for i in indices):
        raise Unsupported("pairs in the absent slot: DeMo has no absent slot")
    likeness = torch.zeros(1, dtype=torch.float64)
    mean = demo.CompressDCT().batch_decompress(likeness, [i.long() for i in indices], [v.double() for v in values],
                                               native(shape, chunk), numel)
    return transform(list(shape), chunk).decode(mean)


def error_feedback(inputs: dict) -> dict:
    if inputs["quantize_1bit"]:
        raise Unsupported("error_feedback with 1-bit signs: DeMo sends values")
    grads, chunk, topk, decay = inputs["grads"].double(), inputs["chunk"], inputs["topk"], inputs["decay"]
    delta, sent = torch.zeros(grads.shape[1:], dtype=torch.float64), []
    shape = list(grads.shape[1:])
    for grad, lr in zip(grads, inputs["lrs"]):   # DeMo.step's lines, one parameter
        if decay != 1:
            delta.mul_(decay)
        delta.add_(grad, alpha=lr)
        indices, values = compress(delta, chunk, topk, inputs["zero_blocks"])
        delta.sub_(mean_of_pairs([indices], [values], shape, chunk))
        sent.append((indices, values))
    return {"indices": torch.stack([i for i, _ in sent]), "values": torch.stack([v for _, v in sent]), "residual": delta}


def aggregate(inputs: dict) -> dict:
    if inputs["semantics"] != "coeff":
        raise Unsupported(f"aggregate semantics {inputs['semantics']!r}: DeMo has the per-coefficient mean only")
    chunk, receiver, payloads = inputs["chunk"], inputs["receiver_shapes"], inputs["payloads"]
    if any(list(p["params"][name]["shape"]) != list(shape) for p in payloads for name, shape in receiver.items()):
        raise Unsupported("aggregate of mixed shapes: DeMo's peers all hold the full model")
    updates = {name: mean_of_pairs([p["params"][name]["indices"] for p in payloads],
                                   [p["params"][name]["values"] for p in payloads], shape, chunk)
               for name, shape in receiver.items()}
    return {"updates": updates, "contributing_peers": len(payloads)}


def apply_update(inputs: dict) -> dict:
    if inputs["rule"] != "sign":
        raise Unsupported(f"apply_update rule {inputs['rule']!r}: DeMo applies sign-SGD")
    lr, wd, out = inputs["lr"], inputs["weight_decay"], {}
    for name, p in inputs["params"].items():   # DeMo.step: decay the weight, sign the gradient, SGD
        p = p.double().clone()
        if wd != 0.0:
            p.mul_(1.0 - lr * wd)
        out[name] = p.add_(inputs["updates"][name].double().sign(), alpha=-lr)
    return {"params": out}


OPS = {
    "chunk_size": lambda i: {"size": demo._get_smaller_split(i["n"], i["chunk"])},
    "dct_encode": lambda i: {"coeffs": encode(i["x"], i["chunk"])},
    "dct_decode": lambda i: {"x": decode(i["coeffs"], i["shape"], i["chunk"])},
    "compress": lambda i: dict(zip(("indices", "values"), compress(i["x"], i["chunk"], i["topk"], i["zero_blocks"]))),
    "batch_decompress": lambda i: {"x": mean_of_pairs([p["indices"] for p in i["payloads"]],
                                                      [p["values"] for p in i["payloads"]], i["shape"], i["chunk"])},
    "error_feedback": error_feedback,
    "aggregate": aggregate,
    "apply_update": apply_update,
}


def resolve(value, directory: Path, files: dict):
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            ref = value["tensor"]
            if ref["file"] not in files:   # one file at a time: an export's op shares one, a fuzz case has its own
                files.clear()
                files[ref["file"]] = load_file(str(directory / ref["file"]))
            return files[ref["file"]][ref["key"]]
        return {k: resolve(v, directory, files) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, directory, files) for v in value]
    return value


def encode_output(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "data": value.reshape(-1).tolist()}
    if isinstance(value, dict):
        return {k: encode_output(v) for k, v in value.items()}
    return value


def main() -> None:
    directory, files = None, {}
    for line in sys.stdin:
        request = json.loads(line)
        if "hello" in request:
            directory, files = Path(request["hello"]["dir"]), {}
            reply = {"hello": {"implementation": "demo (bloc97/DeMo)", "ops": sorted(OPS)}}
        else:
            try:
                reply = {"id": request["id"],
                         "outputs": encode_output(OPS[request["op"]](resolve(request["inputs"], directory, files)))}
            except Unsupported as unsupported:
                reply = {"id": request["id"], "unsupported": str(unsupported)}
            except (ValueError, RuntimeError) as err:   # DeMo refusing an input (a bad chunk or k)
                reply = {"id": request["id"], "error": {"kind": "ConfigError", "message": str(err)}}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
