"""For each planted bug of tests/planted_bugs.py that lives in an op the conformance vectors
export, the shrunk input of that op on which the bug changes matsim's answer: Hypothesis's
`find` over the op's inputs, the bug planted in the answer it compares against the honest
one. Written to sim/vectors/killers.json; `matsim vectors export` turns each into a case
flagged kills:BUG, so the vectors carry the suite's bug-finding power to any implementation
(tests/test_vectors.py checks that each still kills its bug).

    .venv/bin/python -m scripts.pin_killers [--examples 2000]
"""
import argparse
import json

import pytest
import torch
from hypothesis import HealthCheck, find, settings
from hypothesis import strategies as st

from scripts import CHECKOUT as REPO
from sim import vectors
from sim.conformance import OPS, encode, error_kind
from sim.errors import SimError
from sim.vectors import cases, store
from tests.planted_bugs import plant

KILLERS = REPO / "sim" / "vectors" / "killers.json"
SMALL = st.integers(-3, 3).map(float)


def tensor(*shape):
    count = 1
    for n in shape:
        count *= n
    return st.lists(SMALL, min_size=count, max_size=count).map(lambda xs: torch.tensor(xs).reshape(shape))


@st.composite
def aligned(draw, expand=True):
    name = draw(st.sampled_from(vectors.NAMES))
    dim, full, other = int("down_proj.weight" in name), draw(st.sampled_from([2, 4, 8])), draw(st.integers(1, 3))
    narrow = full >> draw(st.integers(1, 2)) or 1
    source, target = ([narrow, other], [full, other]) if "weight" in name else ([narrow], [full])
    if dim:
        source, target = source[::-1], target[::-1]
    if not expand:
        source, target = target, source
    return {"name": name, "grad": draw(tensor(*source)), "target_shape": target}


@st.composite
def slabs(draw):
    name = draw(st.sampled_from(vectors.NAMES[:3]))
    dim, full, other = int("down_proj" in name), draw(st.sampled_from([4, 8])), draw(st.integers(1, 2))
    neurons = sorted(draw(st.sets(st.integers(full // 2, full - 1), min_size=1)))
    shape = [len(neurons), other] if dim == 0 else [other, len(neurons)]
    return {"name": name, "values": draw(tensor(*shape)), "indices": torch.tensor(neurons),
            "target_shape": [full, other] if dim == 0 else [other, full]}


@st.composite
def compressible(draw, zero_blocks="absent"):
    n, chunk = draw(st.integers(2, 8)), draw(st.sampled_from([2, 4]))
    return {"x": draw(tensor(n)), "chunk": chunk, "topk": draw(st.integers(1, 3)), "zero_blocks": zero_blocks}


@st.composite
def quantizable(draw):
    inputs = draw(compressible("sent"))
    out = OPS["compress"](inputs)
    return {"indices": out["indices"], "values": out["values"], "shape": list(inputs["x"].shape),
            "chunk": inputs["chunk"], "zero_blocks": "sent"}


@st.composite
def feedback(draw):
    steps, n = draw(st.integers(2, 3)), draw(st.integers(2, 8))
    return {"grads": draw(tensor(steps, n)), "lrs": [1.0] * steps, "chunk": draw(st.sampled_from([2, 4])),
            "topk": 1, "decay": 0.5, "quantize_1bit": False, "zero_blocks": "absent"}


def generated(op):
    """The vectors' own cases of `op` (inputs and flags), by index: for ops whose inputs are
    whole payloads; the shrunk one is the lowest index that kills."""
    return st.integers(0, 199).map(lambda index: vectors.CASES[op](cases.Draws(0, op, index), index)[:2])


@st.composite
def applied(draw):
    params = {"model.norm.weight": draw(tensor(2)), "w": draw(tensor(2))}
    return {"params": params, "updates": {name: draw(tensor(2)) for name in params}, "lr": 0.5,
            "rule": draw(st.sampled_from(["sign", "sgd"])), "weight_decay": draw(st.sampled_from([0.0, 0.5]))}


@st.composite
def helpers(draw):
    full = draw(st.sampled_from([8, 16, 64]))
    return {"seed": draw(st.integers(0, 100)), "round": draw(st.integers(0, 4)), "layer": draw(st.integers(0, 3)),
            "width": full >> draw(st.integers(1, 2)), "full": full, "fraction": draw(st.sampled_from([0.25, 0.5, 1.0])),
            "rotation_interval": 1}


# ops whose inputs are whole payloads: searched over the vectors' own cases (`generated`)
GENERATED = {
    "aggregate": ("coeff_mean_divides_by_all_peers", "sign_taken_before_the_mean", "peer_silently_skipped",
                  "narrow_payloads_zeroed_but_counted", "narrow_mlp_contributions_dropped",
                  "suffix_divided_by_all_peers"),
    "receive": ("rejected_payloads_counted_as_contributing", "duplicate_payload_applied_twice",
                "late_payload_accepted_next_round"),
    "decode_frame": ("nan_payload_accepted",),
}
NAMED = st.sampled_from(vectors.NAMES + vectors.NEAR_MISSES).map(lambda n: {"name": n})
# bug -> (op, strategy of that op's inputs)
TARGETS = {
    "down_proj_sliced_on_rows": ("prefix_dim", NAMED),
    "substring_name_matching": ("prefix_dim", NAMED),
    "gradient_padded_at_the_front": ("align_prefix_grad", aligned()),
    "narrow_gradients_aligned_into_the_last_neurons": ("align_prefix_grad", aligned()),
    "helper_slab_placed_at_the_prefix": ("align_sparse_grad", slabs()),
    "topk_keeps_the_smallest": ("compress", compressible()),
    "one_bit_zeros_sent_as_zero": ("quantize_1bit", quantizable()),
    "error_feedback_dropped": ("error_feedback", feedback()),
    "error_feedback_reset_every_step": ("error_feedback", feedback()),
    "weight_decay_applied_twice": ("apply_update", applied()),
    "one_parameter_never_updated": ("apply_update", applied()),
    "helper_indices_from_the_whole_width": ("helper_indices", helpers()),
    **{bug: (op, generated(op)) for op, bugs in GENERATED.items() for bug in bugs},
}


def answer(op: str, inputs: dict):
    try:
        return OPS[op](inputs)
    except SimError as err:
        return {"error": error_kind(err)}
    except Exception as err:  # noqa: BLE001 - a bug may break the op outright: that is an answer too
        return {"error": type(err).__name__}


def kills(bug: str, op: str, inputs: dict) -> bool:
    honest = answer(op, inputs)
    with pytest.MonkeyPatch.context() as patched:
        plant(patched, bug)
        return not store._same(honest, answer(op, inputs), store.FLOAT if op in cases.FLOAT_OPS else store.EXACT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    found = []
    for bug, (op, strategy) in TARGETS.items():
        if op not in GENERATED:
            strategy = strategy.map(lambda inputs: (inputs, []))
        inputs, flags = find(strategy, lambda made, bug=bug, op=op: kills(bug, op, made[0]),
                             settings=settings(max_examples=args.examples, database=None, derandomize=True,
                                               suppress_health_check=list(HealthCheck)))
        found.append({"bug": bug, "op": op, "inputs": encode(inputs), "flags": flags})
        print(f"{bug}: {op} {json.dumps(encode(inputs))[:150]}")
    KILLERS.write_text("[\n" + ",\n".join(json.dumps(k, sort_keys=True) for k in found) + "\n]\n")  # one bug a line
    print(f"written: {KILLERS} ({len(found)} bugs)")


if __name__ == "__main__":
    main()
