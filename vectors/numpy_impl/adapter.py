"""A second, independent implementation of part of matsim's mathematics, in plain numpy:
no torch, no import of `sim`. It serves the conformance protocol (vectors/FORMAT.md) so
`matsim vectors check DIR --impl "python vectors/numpy_impl/adapter.py"` runs it; that it
passes shows the format and protocol are implementation-neutral, and checks matsim's
mathematics a second time.

Ops: prefix_dim, align_prefix_grad, align_sparse_grad, chunk_size, dct_encode, dct_decode,
compress, batch_decompress, aggregate (coeff, peer and region semantics, mixed tiers),
apply_update."""
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

PREFIX_DIMS = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}


class Refused(Exception):
    """An input the operation refuses; `kind` is matsim's name for it."""
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def prefix_dim(name: str) -> int:
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "mlp" and parts[-2] in PREFIX_DIMS:
        if parts[-1] == "weight":
            return PREFIX_DIMS[parts[-2]]
        if parts[-1] == "bias" and parts[-2] != "down_proj":
            return 0
    raise Refused("UnsupportedParameter", f"{name!r} is not sliced by tiers")


def align_prefix_grad(name: str, grad: np.ndarray, target: list[int]) -> np.ndarray:
    dim = prefix_dim(name)
    if grad.ndim != len(target) or any(g != t for i, (g, t) in enumerate(zip(grad.shape, target)) if i != dim):
        raise Refused("ShapeMismatch", f"{name}: {list(grad.shape)} differs from {target} off axis {dim}")
    if grad.shape[dim] >= target[dim]:
        return np.take(grad, range(target[dim]), axis=dim)
    out = np.zeros(target, dtype=grad.dtype)
    index = [slice(None)] * grad.ndim
    index[dim] = slice(0, grad.shape[dim])
    out[tuple(index)] = grad
    return out


def align_sparse_grad(name: str, values: np.ndarray, indices: np.ndarray, target: list[int]) -> np.ndarray:
    """Helper neurons' values scattered at their indices along the prefix axis."""
    dim = prefix_dim(name)
    if indices.size and (indices.min() < 0 or indices.max() >= target[dim] or len(set(indices.tolist())) != indices.size):
        raise Refused("AlignmentError", f"{name}: helper indices out of range or repeated")
    out = np.zeros(target, dtype=values.dtype)
    index = [slice(None)] * len(target)
    index[dim] = indices
    out[tuple(index)] = values
    return out


def chunk_size(n: int, chunk: int) -> int:
    return max(d for d in range(1, min(n, chunk) + 1) if n % d == 0)


def dct(n: int) -> np.ndarray:
    """Orthonormal DCT-II: row k is sqrt(2/n) c_k cos(pi (2i + 1) k / 2n), c_0 = 1/sqrt 2."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    basis = np.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis


def blocks_of(shape, chunk: int) -> tuple[tuple, tuple]:
    block = tuple(chunk_size(n, chunk) for n in shape)
    return tuple(n // b for n, b in zip(shape, block)), block


def encode(x: np.ndarray, chunk: int) -> np.ndarray:
    """[R, C] -> [R/br, C/bc, br*bc]: each block's 2-D DCT, row-major; 1-D alike."""
    grid, block = blocks_of(x.shape, chunk)
    if x.ndim == 1:
        return x.astype(np.float64).reshape(grid[0], block[0]) @ dct(block[0]).T
    tiles = x.astype(np.float64).reshape(grid[0], block[0], grid[1], block[1]).transpose(0, 2, 1, 3)
    return (dct(block[0]) @ tiles @ dct(block[1]).T).reshape(grid[0], grid[1], -1)


def decode(coeffs: np.ndarray, shape, chunk: int) -> np.ndarray:
    grid, block = blocks_of(shape, chunk)
    if len(shape) == 1:
        return (coeffs @ dct(block[0])).reshape(shape)
    tiles = dct(block[0]).T @ coeffs.reshape(grid[0], grid[1], *block) @ dct(block[1])
    return tiles.transpose(0, 2, 1, 3).reshape(shape)


KEY_MANTISSA = 32   # FORMAT.md: magnitudes rank at 32 bits of mantissa, equal ranks to the lowest index


def compress(x: np.ndarray, chunk: int, topk: int, zero_blocks: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-k magnitudes per block, ties to the lowest index; exact zeros to the absent slot."""
    coeffs = encode(x, chunk)
    numel = coeffs.shape[-1]
    k = min(topk, numel)
    # A non-negative float64's bits order as the float does: its top bits are its rank.
    rank = np.abs(coeffs).astype(np.float64).view(np.int64) >> (52 - KEY_MANTISSA)
    indices = np.argsort(-rank, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(coeffs, indices, -1)
    if zero_blocks == "absent":
        indices = np.where(values == 0, numel, indices)
    order = np.argsort(indices, axis=-1, kind="stable")   # the vectors' order: ascending index
    return np.take_along_axis(indices, order, -1), np.take_along_axis(values, order, -1)


def coefficient_mean(indices: np.ndarray, values: np.ndarray, numel: int) -> np.ndarray:
    """Per block [..., n] pairs -> [..., numel]: each coefficient's mean over the pairs naming it."""
    flat_i, flat_v = indices.reshape(-1, indices.shape[-1]), values.reshape(-1, values.shape[-1])
    total = np.zeros((flat_i.shape[0], numel + 1))
    count = np.zeros_like(total)
    for row in range(flat_i.shape[0]):
        np.add.at(total[row], flat_i[row], flat_v[row])
        np.add.at(count[row], flat_i[row], 1.0)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)[:, :numel]
    return mean.reshape(*indices.shape[:-1], numel)


def batch_decompress(inputs: dict) -> np.ndarray:
    """Every payload's pairs of one grid, one coefficient mean, one decode."""
    shape, chunk = inputs["shape"], inputs["chunk"]
    numel = math.prod(blocks_of(shape, chunk)[1])
    indices = np.concatenate([np.asarray(p["indices"]) for p in inputs["payloads"]], axis=-1)
    values = np.concatenate([np.asarray(p["values"]) for p in inputs["payloads"]], axis=-1)
    return decode(coefficient_mean(indices, values, numel), shape, chunk)


def aggregate(inputs: dict) -> dict:
    chunk, semantics, receiver = inputs["chunk"], inputs["semantics"], inputs["receiver_shapes"]
    payloads = inputs["payloads"]
    updates = {}
    for name, shape in receiver.items():
        grid, block = blocks_of(shape, chunk)
        numel = math.prod(block)
        if semantics == "coeff":   # every payload's pairs placed at the receiver's blocks, narrow ones leading
            pairs_i = [[] for _ in range(math.prod(grid))]
            pairs_v = [[] for _ in range(math.prod(grid))]
            for payload in payloads:
                sent = payload["params"][name]
                sent_grid, sent_block = blocks_of(sent["shape"], chunk)
                if sent_block != block:
                    raise Refused("ChunkGridMismatch", f"{name}: blocks {sent_block} vs {block}")
                idx = np.asarray(sent["indices"]).reshape(-1, np.asarray(sent["indices"]).shape[-1])
                val = np.asarray(sent["values"]).reshape(idx.shape)
                for b in range(idx.shape[0]):
                    position = np.unravel_index(b, sent_grid)
                    at = int(np.ravel_multi_index(position, grid))
                    keep = idx[b] < numel
                    pairs_i[at] += idx[b][keep].tolist()
                    pairs_v[at] += val[b][keep].tolist()
            mean = np.zeros((math.prod(grid), numel))
            for at in range(len(pairs_i)):
                if pairs_i[at]:
                    mean[at] = coefficient_mean(np.array([pairs_i[at]]), np.array([pairs_v[at]]), numel)[0]
            updates[name] = decode(mean.reshape(*grid, numel), shape, chunk)
            continue
        total, cover = np.zeros(shape), np.zeros(shape)
        for payload in payloads:
            sent = payload["params"][name]
            dense = decode(coefficient_mean(np.asarray(sent["indices"]), np.asarray(sent["values"]),
                                            math.prod(blocks_of(sent["shape"], chunk)[1])), sent["shape"], chunk)
            region = tuple(slice(0, n) for n in sent["shape"])
            total[region] += dense
            cover[region] += 1
        if semantics == "peer":
            updates[name] = total / len(payloads)
        else:
            updates[name] = np.divide(total, cover, out=np.zeros_like(total), where=cover > 0)
    return {"updates": updates, "contributing_peers": len(payloads)}


class Unsupported(Exception):
    """A variant of an op this implementation does not have: answered `unsupported`."""


def apply_update(inputs: dict) -> dict:
    lr, wd, rule = inputs["lr"], inputs["weight_decay"], inputs["rule"]
    if rule not in ("sign", "sgd"):
        raise Unsupported(f"apply_update rule {rule!r}: this implementation applies sign and sgd only")
    out = {}
    for name, p in inputs["params"].items():
        step = np.sign(inputs["updates"][name]) if rule == "sign" else inputs["updates"][name]
        out[name] = p * (1 - lr * wd) - lr * step
    return {"params": out}


OPS = {
    "prefix_dim": lambda i: {"dim": prefix_dim(i["name"])},
    "align_prefix_grad": lambda i: {"aligned": align_prefix_grad(i["name"], i["grad"], i["target_shape"])},
    "align_sparse_grad": lambda i: {"aligned": align_sparse_grad(i["name"], i["values"], i["indices"],
                                                                 i["target_shape"])},
    "batch_decompress": lambda i: {"x": batch_decompress(i)},
    "chunk_size": lambda i: {"size": chunk_size(i["n"], i["chunk"])},
    "dct_encode": lambda i: {"coeffs": encode(i["x"], i["chunk"])},
    "dct_decode": lambda i: {"x": decode(i["coeffs"].astype(np.float64), i["shape"], i["chunk"])},
    "compress": lambda i: dict(zip(("indices", "values"), compress(i["x"], i["chunk"], i["topk"], i["zero_blocks"]))),
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
    if isinstance(value, np.ndarray):
        return {"dtype": str(value.dtype), "shape": list(value.shape), "data": value.reshape(-1).tolist()}
    if isinstance(value, dict):
        return {k: encode_output(v) for k, v in value.items()}
    return value


def main() -> None:
    directory, files = None, {}
    for line in sys.stdin:
        request = json.loads(line)
        if "hello" in request:
            directory = Path(request["hello"]["dir"])
            reply = {"hello": {"implementation": "numpy", "ops": sorted(OPS)}}
        else:
            try:
                reply = {"id": request["id"],
                         "outputs": encode_output(OPS[request["op"]](resolve(request["inputs"], directory, files)))}
            except Refused as refused:
                reply = {"id": request["id"], "error": {"kind": refused.kind, "message": str(refused)}}
            except Unsupported as unsupported:
                reply = {"id": request["id"], "unsupported": str(unsupported)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
