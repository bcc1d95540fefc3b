"""Wire format laws (sim/wire.py)."""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.profiles import scaled
from properties.strategies import aggregation_cases, helper_cases
from sim.wire import Payload, Rejection, decode_payload, encode_payload, frame, resealed

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
        assert decoded.params[name].indices.dtype == torch.int64  # torch.equal compares across dtypes
        assert torch.equal(decoded.params[name].indices, sparse.indices.long())
        assert decoded.params[name].values.dtype == torch.float32
        assert torch.equal(decoded.params[name].values, sparse.values.float())


@given(helper_cases(max_peers=1))
def test_an_encoded_payload_is_the_plain_frame_of_its_header_and_tensors(case):
    """The encoder writes the header's tensor entries once per signature and splices them in:
    its bytes must be exactly json.dumps(header, sort_keys=True) framed around the tensors.
    Catches: an entry spliced into the wrong slot, a stale cached entry, a key out of order."""
    model, distro, (payload,), _ = case
    raw = encode_payload(payload, distro.compression_chunk)
    header, tensors = parts(raw)
    for part, sparses in (("params", payload.params), ("helpers", payload.helper_params)):
        assert header[part] == {name: {"k": s.indices.shape[-1], "shape": list(s.grid.shape)} for name, s in sparses.items()}
    assert raw == frame(header, tensors)


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


def parts(raw: bytes) -> tuple[dict, dict]:
    """A frame's JSON header and body tensors."""
    import json

    import safetensors.torch
    from sim.wire import DIGEST, PREFIX
    head_len = PREFIX.unpack_from(raw)[2]
    return (json.loads(raw[PREFIX.size:PREFIX.size + head_len]),
            safetensors.torch.load(raw[PREFIX.size + head_len:-DIGEST]))


def reframed(payload, distro, edit, version=None):
    """Encode, let `edit` change header/tensors in place, and frame again with a valid
    checksum: what a buggy or hostile peer would send."""
    from sim.wire import VERSION
    header, tensors = parts(encode_payload(payload, distro.compression_chunk))
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


def change_the_chunk(header, tensors):
    header["chunk"] += 1


def flip_quantized(header, tensors):
    header["quantized"] = not header["quantized"]


def peer_as_text(header, tensors):
    header["peer"] = str(header["peer"])


def peer_as_bool(header, tensors):
    header["peer"] = True


def params_as_a_list(header, tensors):
    header["params"] = sorted(header["params"])


def one_helper_count_short(header, tensors):
    header["helper_neurons"] = header["helper_neurons"][:-1]


def negative_helper_count(header, tensors):
    header["helper_neurons"] = [-1] * len(header["helper_neurons"])


def helpers_past_the_suffix(header, tensors):
    header["helper_neurons"] = [10**6] * len(header["helper_neurons"])


def unchanged(header, tensors):
    pass


EDITS = {  # flaw -> (edit, version, the rejection's reason, what its detail must say)
    "old_version": (unchanged, 1, "bad_version", "version 1"),
    "negative_tiers": (negative_tiers, None, "bad_tier", "tiers [-1"),
    "parameter_dropped": (drop_a_parameter, None, "missing_parameter", "missing"),
    "parameter_renamed": (rename_a_parameter, None, "unknown_parameter",
                          "parameters ['model.layers.0.mlp.gate_projection.weight'] are not in the model for the sender's tiers"),
    "shape_grown": (grow_a_shape, None, "bad_shape", "shape"),
    "k_raised": (raise_a_k, None, "bad_shape", "is not"),
    "index_past_the_block": (index_past_the_block, None, "index_out_of_range", "index 30000 is outside"),
    "int32_indices": (widen_index_dtype, None, "bad_dtype", "torch.int32"),
    "indices_dropped": (drop_the_indices, None, "malformed", "no index tensor"),
    "one_index_short": (cut_one_index, None, "bad_shape", "indices, expected"),
    "values_dropped": (drop_the_values, None, "malformed", "tensor"),
    "one_value_short": (cut_one_value, None, "bad_shape", "for"),
    "float64_values": (widen_the_values, None, "bad_dtype", "torch.float64"),
    "round_dropped": (drop_the_round, None, "malformed", "round"),
    "chunk_changed": (change_the_chunk, None, "malformed", "is not the run's"),
    "quantized_flipped": (flip_quantized, None, "malformed", "disagrees with the run's quantize_1bit"),
    "peer_as_text": (peer_as_text, None, "malformed", "must be integers"),
    "peer_as_bool": (peer_as_bool, None, "malformed", "must be integers"),
    "params_as_a_list": (params_as_a_list, None, "malformed", "params and helpers objects"),
    "helper_count_short": (one_helper_count_short, None, "bad_helper", "one count >= 0 per layer"),
    "helper_count_negative": (negative_helper_count, None, "bad_helper", "one count >= 0 per layer"),
    "helpers_past_the_suffix": (helpers_past_the_suffix, None, "bad_helper", "do not fit the suffix"),
}


@pytest.mark.parametrize("flaw", sorted(EDITS))
@scaled(0.25)
@given(cases)
def test_a_well_framed_but_invalid_payload_is_rejected_with_its_reason(flaw, case):
    """Catches: validation that trusts a valid checksum (version, tiers, names, shapes, k,
    ranges, dtypes), or one comparison of the whole header standing in for the checks."""
    model, distro, (payload,), _ = case
    edit, version, reason, says = EDITS[flaw]
    result = decode_payload(reframed(payload, distro, edit, version), model, distro)
    assert isinstance(result, Rejection) and result.reason == reason and says in result.detail, result
    if flaw == "k_raised":
        name = sorted(payload.params)[-1]
        k = payload.params[name].indices.shape[-1]
        assert result.detail == f"{name}: k {k + 1} is not {k}"


@given(helper_cases(max_peers=1))
def test_header_fields_a_receiver_does_not_know_are_ignored(case):
    """A newer sender may describe a tensor (parameter or helper slab) with more than shape and
    k. Catches: the whole-header comparison standing in for validation, rejecting what the field
    checks accept."""
    model, distro, (payload,), _ = case

    def annotate(header, tensors):
        for meta in [*header["params"].values(), *header["helpers"].values()]:
            meta["note"] = "from a newer sender"
    assert isinstance(decode_payload(reframed(payload, distro, annotate), model, distro), Payload)


@given(cases, st.data())
def test_absent_slots_round_trip(case, data):
    """A block with fewer non-zero coefficients than k (all-zero: none) sends absent slots
    (index block_numel, value 0), possibly several: honest, and accepted. Catches: a range
    check that ends below the absent slot, or a duplicate check that mistakes two absent
    slots, or an absent slot and a real coefficient, for one coefficient named twice."""
    model, distro, (payload,), _ = case
    sparse = payload.params[data.draw(st.sampled_from(sorted(payload.params)))]
    slots = sparse.indices.numel()
    chosen = data.draw(st.lists(st.integers(0, slots - 1), min_size=1, unique=True), label="absent slots")
    absent = torch.zeros(slots, dtype=torch.bool)
    absent[chosen] = True
    sparse.indices.masked_fill_(absent.view(sparse.indices.shape), sparse.grid.block_numel)
    sparse.values.masked_fill_(absent.view(sparse.values.shape), 0.0)
    decoded = decode_payload(encode_payload(payload, distro.compression_chunk), model, distro)
    assert isinstance(decoded, Payload), decoded
    for name, sent in payload.params.items():
        assert torch.equal(decoded.params[name].indices, sent.indices.long())
        assert torch.equal(decoded.params[name].values, sent.values.float())


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
    assert result.detail == "a block names one coefficient twice"


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
    assert result.detail == "a value is NaN or infinite"


NEURON_FLAWS = {  # flaw -> (edit of the body's tensors, what the rejection must say)
    "missing": (lambda tensors: tensors.pop("neurons"), "no neuron index tensor"),
    "int64": (lambda tensors: tensors.update(neurons=tensors["neurons"].long()), "expected int32"),
    "one_short": (lambda tensors: tensors.update(neurons=tensors["neurons"][:-1]), "expected int32"),
}


@pytest.mark.parametrize("flaw", sorted(NEURON_FLAWS))
@scaled(0.5)
@given(helper_cases(max_peers=1))
def test_a_malformed_neuron_tensor_is_rejected_as_bad_helper(flaw, case):
    """Catches: a receiver that places helper slabs without neuron indices, reads them in
    another dtype or pairs a slab with too few (and so with the wrong) neurons; a payload
    without helpers carrying neurons anyway."""
    model, distro, (payload,), _ = case
    edit, says = NEURON_FLAWS[flaw]
    if not payload.helper_neurons:  # no helpers: any neuron tensor is one too many
        edit, says = (lambda tensors: tensors.update(neurons=torch.zeros(1, dtype=torch.int32))), "without helper counts"
    result = decode_payload(reframed(payload, distro, lambda header, tensors: edit(tensors)), model, distro)
    assert isinstance(result, Rejection) and result.reason == "bad_helper" and says in result.detail, result


def overrun_the_header_length(body: bytearray) -> bytearray:
    body[6:10] = (len(body) + 1).to_bytes(4, "little")
    return body


FRAME_FLAWS = {  # flaw -> (bytes from a good payload's, the rejection's reason, what its detail must say)
    "not_bytes": (lambda raw: raw.hex(), "truncated", "payload of str bytes"),
    "shorter_than_a_frame": (lambda raw: raw[:41], "truncated", "payload of 41 bytes is shorter than the 42-byte frame"),
    "bad_magic": (lambda raw: resealed(raw, lambda body: bytearray(b"XSIM") + body[4:]), "bad_magic",
                  "magic b'XSIM' is not b'MSIM'"),
    "bad_checksum": (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "bad_checksum", "sha256 does not match"),
    "header_overruns": (lambda raw: resealed(raw, overrun_the_header_length), "truncated", "overruns the payload"),
}


@pytest.mark.parametrize("flaw", sorted(FRAME_FLAWS))
@scaled(0.25)
@given(cases)
def test_a_broken_frame_is_rejected_with_its_reason(flaw, case):
    """Catches: a frame check that trusts its length fields, magic or checksum, or rejects
    without saying what was wrong."""
    model, distro, (payload,), _ = case
    broken, reason, says = FRAME_FLAWS[flaw]
    result = decode_payload(broken(encode_payload(payload, distro.compression_chunk)), model, distro)
    assert isinstance(result, Rejection) and result.reason == reason and says in result.detail, result


def test_indices_are_int16_while_every_block_and_its_absent_slot_fit():
    """Catches: an off-by-one at the int16 boundary (the absent slot, index block_numel, must fit)."""
    from sim.distro import ChunkGrid
    from sim.wire import index_dtype
    fits, needs_more = ChunkGrid((32766,), (32766,)), ChunkGrid((32767,), (32767,))
    assert index_dtype([fits]) == torch.int16 and index_dtype([fits, needs_more]) == torch.int32


@given(cases)
def test_payload_size_is_the_length_of_every_payload_at_those_tiers(case):
    """The bandwidth report's figure (scripts/bandwidth.py) is fixed by shapes, k and
    quantization. Catches: a size computed for other tiers, another k, or an unquantized body."""
    from sim.model import local_shapes, param_count
    from sim.wire import dense_bytes, payload_size
    model, distro, (payload,), _ = case
    assert payload_size(model, distro, payload.tiers) == len(encode_payload(payload, distro.compression_chunk))
    assert dense_bytes(local_shapes(model, payload.tiers)) == 4 * param_count(model, payload.tiers)


@given(helper_cases(max_peers=1))
def test_a_helper_slab_the_sender_does_not_have_is_rejected_naming_it(case):
    """Catches: helper slab headers trusted (or validated by a loop that breaks on them) where
    parameter headers are checked."""
    model, distro, (payload,), _ = case
    if not payload.helper_params:
        return

    def rename(header, tensors):
        header["helpers"]["model.layers.0.mlp.up_projection.weight"] = header["helpers"].pop(sorted(header["helpers"])[0])
    result = decode_payload(reframed(payload, distro, rename), model, distro)
    assert isinstance(result, Rejection) and result.reason == "unknown_parameter", result
    assert result.detail == ("helper slabs ['model.layers.0.mlp.up_projection.weight'] are not in the model "
                             "for the sender's helper counts")
