"""Wire format laws (sim/wire.py)."""
import dataclasses

import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import aggregation_cases
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


def unchanged(header, tensors):
    pass


EDITS = {  # reason -> (edit, version)
    "bad_version": (unchanged, 1),
    "bad_tier": (negative_tiers, None),
    "missing_parameter": (drop_a_parameter, None),
    "index_out_of_range": (index_past_the_block, None),
    "bad_dtype": (widen_index_dtype, None),
    "malformed": (drop_the_round, None),
}


@given(cases, st.sampled_from(sorted(EDITS)))
def test_a_well_framed_but_invalid_payload_is_rejected_with_its_reason(case, reason):
    """Catches: validation that trusts a valid checksum (version, tiers, ranges, dtypes)."""
    model, distro, (payload,), _ = case
    result = decode_payload(reframed(payload, distro, *EDITS[reason]), model, distro)
    assert isinstance(result, Rejection) and result.reason == reason, result


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
