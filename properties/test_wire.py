"""Wire format laws (sim/wire.py)."""
import dataclasses

import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import aggregation_cases, helper_cases
from sim.wire import Payload, Rejection, decode_payload, encode_payload, frame

cases = aggregation_cases(min_peers=1, max_peers=1)


@given(cases)
def test_encode_then_decode_is_bit_exact(case):
    """Catches: lossy dtypes, reordered parameters, a header field dropped on the way."""
    model, distro, (payload,), _ = case
    decoded = decode_payload(encode_payload(payload, distro.compression_chunk), model, distro)
    assert isinstance(decoded, Payload), decoded
    assert (decoded.peer, decoded.round, decoded.tiers, decoded.quantized) == \
        (payload.peer, payload.round, payload.tiers, payload.quantized)
    assert decoded.params.keys() == payload.params.keys()
    for name, sparse in payload.params.items():
        assert decoded.params[name].grid == sparse.grid
        assert torch.equal(decoded.params[name].indices, sparse.indices.long())
        assert torch.equal(decoded.params[name].values, sparse.values.float())


@given(cases, st.data())
def test_any_single_flipped_byte_is_rejected(case, data):
    """Catches: a checksum that skips part of the frame (header, body or itself)."""
    model, distro, (payload,), _ = case
    raw = bytearray(encode_payload(payload, distro.compression_chunk))
    raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    assert isinstance(decode_payload(bytes(raw), model, distro), Rejection)


@given(cases, st.data())
def test_every_truncation_is_rejected(case, data):
    model, distro, (payload,), _ = case
    raw = encode_payload(payload, distro.compression_chunk)
    result = decode_payload(raw[:data.draw(st.integers(0, len(raw) - 1))], model, distro)
    assert isinstance(result, Rejection) and result.reason in ("truncated", "bad_checksum")


def reframed(payload, distro, edit, version=None):
    """Encode, let `edit` change header/tensors in place, and frame again with a valid
    checksum: what a buggy or hostile peer would send."""
    import json

    import safetensors.torch
    from sim.wire import DIGEST, PREFIX, VERSION
    raw = encode_payload(payload, distro.compression_chunk)
    head_len = PREFIX.unpack_from(raw)[2]
    header = json.loads(raw[PREFIX.size:PREFIX.size + head_len])
    tensors = safetensors.torch.load(raw[PREFIX.size + head_len:-DIGEST])
    edit(header, tensors)
    return frame(header, tensors, version=version or VERSION)


def negative_tiers(header, tensors):
    header["tiers"] = [-1] * len(header["tiers"])


def drop_a_parameter(header, tensors):
    del header["params"][sorted(header["params"])[0]]


def index_past_the_block(header, tensors):
    tensors["idx"][0] = 30000


def widen_index_dtype(header, tensors):
    tensors["idx"] = tensors["idx"].int()


def drop_the_round(header, tensors):
    del header["round"]


def rename_a_parameter(header, tensors):
    header["params"]["model.layers.0.mlp.gate_projection.weight"] = header["params"].pop(sorted(header["params"])[0])


def grow_a_shape(header, tensors):
    header["params"][sorted(header["params"])[0]]["shape"][0] += 1


def raise_a_k(header, tensors):
    header["params"][sorted(header["params"])[-1]]["k"] += 1


def drop_the_indices(header, tensors):
    del tensors["idx"]


def drop_the_values(header, tensors):
    del tensors["sign" if "sign" in tensors else "val"]


def cut_one_index(header, tensors):
    tensors["idx"] = tensors["idx"][:-1]


def cut_one_value(header, tensors):
    key = "sign" if "sign" in tensors else "val"
    tensors[key] = tensors[key][:-1]


def widen_the_values(header, tensors):
    key = "sign" if "sign" in tensors else "val"
    tensors[key] = tensors[key].double()


def unchanged(header, tensors):
    pass


EDITS = {  # flaw -> (edit, version, the rejection's reason, what its detail must say)
    "old_version": (unchanged, 1, "bad_version", "version 1"),
    "negative_tiers": (negative_tiers, None, "bad_tier", "tiers [-1"),
    "parameter_dropped": (drop_a_parameter, None, "missing_parameter", "missing"),
    "parameter_renamed": (rename_a_parameter, None, "unknown_parameter", "gate_projection"),
    "shape_grown": (grow_a_shape, None, "bad_shape", "shape"),
    "k_raised": (raise_a_k, None, "bad_shape", "k "),
    "index_past_the_block": (index_past_the_block, None, "index_out_of_range", "index 30000 is outside"),
    "int32_indices": (widen_index_dtype, None, "bad_dtype", "torch.int32"),
    "indices_dropped": (drop_the_indices, None, "malformed", "no index tensor"),
    "one_index_short": (cut_one_index, None, "bad_shape", "indices, expected"),
    "values_dropped": (drop_the_values, None, "malformed", "tensor"),
    "one_value_short": (cut_one_value, None, "bad_shape", "for"),
    "float64_values": (widen_the_values, None, "bad_dtype", "torch.float64"),
    "round_dropped": (drop_the_round, None, "malformed", "round"),
}


@given(cases, st.sampled_from(sorted(EDITS)))
def test_a_well_framed_but_invalid_payload_is_rejected_with_its_reason(case, flaw):
    """Catches: validation that trusts a valid checksum (version, tiers, names, shapes, k,
    ranges, dtypes), or one comparison of the whole header standing in for the checks."""
    model, distro, (payload,), _ = case
    edit, version, reason, says = EDITS[flaw]
    result = decode_payload(reframed(payload, distro, edit, version), model, distro)
    assert isinstance(result, Rejection) and result.reason == reason and says in result.detail, result


@given(cases, st.data())
def test_absent_slots_round_trip(case, data):
    """An all-zero block sends only absent slots (index block_numel, value 0): honest, and
    accepted. Catches: a range check that ends below the absent slot, rejecting every payload
    that holds an untouched block (unused embedding rows, say)."""
    model, distro, (payload,), _ = case
    sparse = payload.params[data.draw(st.sampled_from(sorted(payload.params)))]
    sparse.indices.view(-1, sparse.indices.shape[-1])[0] = sparse.grid.block_numel
    sparse.values.view(-1, sparse.values.shape[-1])[0] = 0.0
    decoded = decode_payload(encode_payload(payload, distro.compression_chunk), model, distro)
    assert isinstance(decoded, Payload), decoded
    for name, sent in payload.params.items():
        assert torch.equal(decoded.params[name].indices, sent.indices.long())


@given(cases)
def test_duplicate_indices_in_a_block_are_rejected(case):
    """Catches: one peer counted twice in a coefficient's mean."""
    model, distro, (payload,), _ = case
    wide = [s for s in payload.params.values() if s.indices.shape[-1] >= 2]
    if not wide:
        return
    wide[0].indices[..., 1] = wide[0].indices[..., 0]
    result = decode_payload(encode_payload(payload, distro.compression_chunk), model, distro)
    assert isinstance(result, Rejection) and result.reason == "duplicate_index"


@given(cases, st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.data())
def test_a_non_finite_value_is_rejected_as_non_finite(case, value, data):
    """Catches: NaN or Inf accepted onto every receiver's aggregate. (1-bit payloads carry
    signs, so the case is made unquantized.)"""
    model, distro, (payload,), _ = case
    distro, payload.quantized = dataclasses.replace(distro, quantize_1bit=False), False
    sparse = data.draw(st.sampled_from(sorted(payload.params)))
    values = payload.params[sparse].values.view(-1)
    values[data.draw(st.integers(0, values.numel() - 1))] = value
    result = decode_payload(encode_payload(payload, distro.compression_chunk), model, distro)
    assert isinstance(result, Rejection) and result.reason == "non_finite", result


NEURON_FLAWS = {  # flaw -> (edit of the body's tensors, what the rejection must say)
    "missing": (lambda tensors: tensors.pop("neurons"), "no neuron index tensor"),
    "int64": (lambda tensors: tensors.update(neurons=tensors["neurons"].long()), "expected int32"),
    "one_short": (lambda tensors: tensors.update(neurons=tensors["neurons"][:-1]), "expected int32"),
}


@given(helper_cases(max_peers=1), st.sampled_from(sorted(NEURON_FLAWS)))
def test_a_malformed_neuron_tensor_is_rejected_as_bad_helper(case, flaw):
    """Catches: a receiver that places helper slabs without neuron indices, reads them in
    another dtype or pairs a slab with too few (and so with the wrong) neurons; a payload
    without helpers carrying neurons anyway."""
    model, distro, (payload,), _ = case
    edit, says = NEURON_FLAWS[flaw]
    if not payload.helper_neurons:  # no helpers: any neuron tensor is one too many
        edit, says = (lambda tensors: tensors.update(neurons=torch.zeros(1, dtype=torch.int32))), "without helper counts"
    result = decode_payload(reframed(payload, distro, lambda header, tensors: edit(tensors)), model, distro)
    assert isinstance(result, Rejection) and result.reason == "bad_helper" and says in result.detail, result
