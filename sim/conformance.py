"""The reference adapter: matsim's own implementation behind the conformance protocol.

    python -m sim.conformance        # reads requests on stdin, answers on stdout

The protocol (vectors/FORMAT.md) is line-delimited JSON: the checker sends
{"hello": {"format", "version", "dir"}}, the adapter answers {"hello": {"implementation",
"ops"}}; then one request per case, {"id", "op", "inputs"}, one answer per request,
{"id", "outputs"} or {"id", "error": {"kind", "message"}}. A tensor input is
{"tensor": {"file", "key"}}, a tensor in DIR's safetensors file `file`; a tensor output is
{"dtype", "shape", "data"} (data flat, row-major).

`OPS` is also what `matsim vectors export` computes expected outputs with: each op reads
its inputs as the vectors store them and returns its outputs by name.
"""
import json
import sys
from pathlib import Path

import safetensors.torch
import torch

from sim.aggregate import ApplyRule, aggregate, apply_update, mean_semantics, receive
from sim.align import align_prefix_grad, align_sparse_grad, prefix_dim
from sim.checkpoint import declared_base
from sim.config import DistroConfig, ModelConfig
from sim.distro import ChunkGrid, DistroState, Sparse, batch_decompress, chunk_size, compress, quantize_1bit
from sim.errors import SimError
from sim.helper import helper_indices
from sim.model import local_shapes
from sim.schema import schema_hash
from sim.wire import Payload, Rejection, decode_payload

FORMAT, VERSION = "matsim-vectors", 1


def _prefix_dim(i):
    return {"dim": prefix_dim(i["name"])}


def _align_prefix_grad(i):
    return {"aligned": align_prefix_grad(i["name"], i["grad"], i["target_shape"]).contiguous()}


def _align_sparse_grad(i):
    return {"aligned": align_sparse_grad(i["name"], i["values"], i["indices"], i["target_shape"]).contiguous()}


def _batch_decompress(i):
    grid = ChunkGrid.of(tuple(i["shape"]), i["chunk"])
    return {"x": batch_decompress([Sparse(grid, p["indices"], p["values"]) for p in i["payloads"]])}


def _chunk_size(i):
    return {"size": chunk_size(i["n"], i["chunk"])}


def _dct_encode(i):
    return {"coeffs": ChunkGrid.of(tuple(i["x"].shape), i["chunk"]).encode(i["x"])}


def _dct_decode(i):
    return {"x": ChunkGrid.of(tuple(i["shape"]), i["chunk"]).decode(i["coeffs"])}


def _canonical(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's pairs in ascending index order (the absent slot, block_numel, last): top-k
    is a set, and the vectors fix one order for every implementation."""
    order = indices.long().argsort(dim=-1, stable=True)
    return indices.long().gather(-1, order), values.gather(-1, order)


def _compress(i):
    sparse = compress(i["x"], i["chunk"], i["topk"], zero_blocks=i["zero_blocks"])
    indices, values = _canonical(sparse.indices, sparse.values)
    return {"indices": indices, "values": values}


def _quantize_1bit(i):
    grid = ChunkGrid.of(tuple(i["shape"]), i["chunk"])
    return {"values": quantize_1bit(Sparse(grid, i["indices"], i["values"]), i["zero_blocks"]).values}


def _error_feedback(i):
    """DisTrO steps over a sequence of gradients: what each step sends, and what is left."""
    config = DistroConfig(compression_decay=i["decay"], compression_chunk=i["chunk"], compression_topk=i["topk"],
                          quantize_1bit=i["quantize_1bit"], zero_blocks=i["zero_blocks"])
    state, sent = DistroState.fresh(config), []
    for grad, lr in zip(i["grads"], i["lrs"]):
        sent.append(state.step("w", grad, lr)[0])
    pairs = [_canonical(s.indices, s.values) for s in sent]
    return {"indices": torch.stack([p[0] for p in pairs]), "values": torch.stack([p[1] for p in pairs]),
            "residual": state.delta["w"]}


def _aggregate(i):
    """Payloads of peers at their tiers, combined into the receiver's shapes."""
    distro = DistroConfig(compression_chunk=i["chunk"], compression_topk=1, quantize_1bit=i["quantized"])
    payloads = []
    for peer, sent in enumerate(i["payloads"]):
        params = {name: Sparse(ChunkGrid.of(tuple(p["shape"]), i["chunk"]), p["indices"], p["values"])
                  for name, p in sent["params"].items()}
        payloads.append(Payload(peer, 0, tuple(sent["tiers"]), params, i["quantized"]))
    shapes = {name: tuple(shape) for name, shape in i["receiver_shapes"].items()}
    result = aggregate(payloads, shapes, distro, mean_semantics(i["semantics"]))
    return {"updates": {name: u.contiguous() for name, u in result.updates.items()},
            "contributing_peers": result.contributing_peers}


def _apply_update(i):
    """The apply rule on one replica; under adamw, from the given moments, which it returns too."""
    params = {name: p.clone() for name, p in i["params"].items()}
    moments = {name: (m["m"].clone(), m["v"].clone(), m["t"]) for name, m in i.get("moments", {}).items()}
    apply_update(params, i["updates"], i["lr"], ApplyRule(i["rule"]), i["weight_decay"], adam_state=moments)
    if i["rule"] != "adamw":
        return {"params": params}
    return {"params": params, "moments": {name: {"m": m, "v": v, "t": t} for name, (m, v, t) in moments.items()}}


def _schema_hash(i):
    """The hash of the model a config.json describes: a sliced export's metadata restores its
    base FFN width, so every tier of one model hashes alike."""
    return {"hash": schema_hash(declared_base(i["config"], "case config")[0])}


def _helper_indices(i):
    return {"indices": helper_indices(i["seed"], i["round"], i["layer"], i["width"], i["full"], i["fraction"],
                                      i["rotation_interval"])}


class Rejected(SimError):
    """A frame the wire refuses: reported with the rejection's reason as its error kind."""

    def __init__(self, rejection: Rejection):
        super().__init__(rejection.detail)
        self.kind = rejection.reason


def _run(i) -> tuple[ModelConfig, DistroConfig]:
    """The model and DisTrO settings a frame is read against."""
    return (ModelConfig.from_hf_dict(i["config"], source="case config"),
            DistroConfig(compression_chunk=i["chunk"], compression_topk=i["topk"], quantize_1bit=i["quantized"]))


def _frame(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def _sparse_outputs(sparses) -> dict:
    return {name: {"indices": s.indices.long().contiguous(), "values": s.values.contiguous()}
            for name, s in sorted(sparses.items())}


def _decode_frame(i):
    """One frame as a receiver reads it: its content, or the reason it is rejected."""
    payload = decode_payload(_frame(i["frame"]), *_run(i))
    if isinstance(payload, Rejection):
        raise Rejected(payload)
    return {"peer": payload.peer, "round": payload.round, "tiers": list(payload.tiers), "quantized": payload.quantized,
            "params": _sparse_outputs(payload.params), "helper_params": _sparse_outputs(payload.helper_params),
            "helper_neurons": {str(layer): n.long() for layer, n in sorted(payload.helper_neurons.items())}}


def _receive(i):
    """One round's frames at a receiver of `receiver_tiers`: decoded, validated (round,
    duplicates), aggregated; what counted, what was rejected and why, and the dilution."""
    model, distro = _run(i)
    result = receive([_frame(f) for f in i["frames"]], model, distro, local_shapes(model, i["receiver_tiers"]),
                     mean_semantics(i["semantics"]), i["round"])
    return {"updates": {name: u.contiguous() for name, u in result.updates.items()},
            "contributing_peers": result.contributing_peers, "rejected": dict(sorted(result.rejected.items())),
            "dilution": list(result.dilution)}


OPS = {"prefix_dim": _prefix_dim, "align_prefix_grad": _align_prefix_grad, "align_sparse_grad": _align_sparse_grad,
       "batch_decompress": _batch_decompress, "chunk_size": _chunk_size,
       "dct_encode": _dct_encode, "dct_decode": _dct_decode, "compress": _compress, "quantize_1bit": _quantize_1bit,
       "error_feedback": _error_feedback, "aggregate": _aggregate, "apply_update": _apply_update,
       "schema_hash": _schema_hash, "helper_indices": _helper_indices, "decode_frame": _decode_frame,
       "receive": _receive}


def error_kind(err: Exception) -> str:
    """The kind an error is reported as: a rejected frame's reason (bad_checksum, ...), else
    matsim's exception class (UnsupportedParameter, ...)."""
    return getattr(err, "kind", None) or type(err).__name__


# --- values as the protocol carries them -------------------------------------------

def encode(value):
    """An output as JSON: tensors as {"dtype", "shape", "data"}, containers as they are."""
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "data": value.detach().cpu().reshape(-1).tolist()}
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def resolve(value, directory: Path, files: dict):
    """An input as a request carries it, with every {"tensor": {"file", "key"}} loaded."""
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            ref = value["tensor"]
            if ref["file"] not in files:
                files[ref["file"]] = safetensors.torch.load_file(directory / ref["file"])
            return files[ref["file"]][ref["key"]]
        return {k: resolve(v, directory, files) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, directory, files) for v in value]
    return value


def answer(request: dict, directory: Path, files: dict) -> dict:
    op = request.get("op")
    if op not in OPS:
        return {"id": request.get("id"), "error": {"kind": "UnknownOp", "message": f"op {op!r} is not implemented"}}
    try:
        outputs = OPS[op](resolve(request["inputs"], directory, files))
    except Exception as err:   # noqa: BLE001 - any failure is this case's answer; the adapter serves on
        return {"id": request["id"], "error": {"kind": error_kind(err), "message": str(err)}}
    return {"id": request["id"], "outputs": encode(outputs)}


def serve(lines, out) -> None:
    directory, files = None, {}
    for line in lines:
        request = json.loads(line)
        if "hello" in request:
            directory = Path(request["hello"]["dir"])
            reply = {"hello": {"implementation": "matsim", "format": FORMAT, "version": VERSION, "ops": sorted(OPS)}}
        else:
            reply = answer(request, directory, files)
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main() -> None:
    """Serve stdin (tests/planted_adapter.py serves it with a bug planted)."""
    torch.set_num_threads(1)
    serve(sys.stdin, sys.stdout)


if __name__ == "__main__":
    from sim.conformance import main as served   # the module proper, where a planted bug lands
    served()
