"""Conformance vectors (`matsim vectors export|check`, sim/vectors.py) and the reference
adapter (`python -m sim.conformance`): deterministic exports, 100% on matsim itself, a
failing case for every planted bug of an exported op, and bad directories or misbehaving
implementations reported in one line or per case, never a traceback or a hang."""
import json
import sys
from pathlib import Path

import pytest
import torch

from sim import conformance, vectors
from sim.vectors import cases, store
from sim.wire import REASONS
from tests.cli import matsim_here
from tests.planted_bugs import plant

REFERENCE = f"{sys.executable} -m sim.conformance"
HANG_GUARD_S = 120   # generous: an honest answer takes milliseconds


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return vectors.export(tmp_path_factory.mktemp("vectors") / "v", seed=7, cases_per_op=4)


def test_export_twice_with_one_seed_writes_byte_identical_directories(tmp_path, exported):
    again = vectors.export(tmp_path / "again", seed=7, cases_per_op=4)
    files = sorted(p.name for p in exported.iterdir())
    assert files == sorted(p.name for p in again.iterdir()) and "manifest.json" in files
    assert all((exported / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = vectors.export(tmp_path / "other", seed=8, cases_per_op=4)
    assert (other / "compress.safetensors").read_bytes() != (exported / "compress.safetensors").read_bytes()


def test_every_case_names_its_op_inputs_expectation_tolerance_flags_and_origin(exported):
    cases = vectors.load(exported)
    assert {c["op"] for c in cases} == set(vectors.CASES)
    for case in cases:
        assert {"id", "op", "inputs", "expected", "tolerance", "flags", "made"} <= set(case)
        assert ("outputs" in case["expected"]) != ("error" in case["expected"])
        assert case["made"]["seed"] == 7
    aggregates = [c for c in cases if c["op"] == "aggregate"]
    assert all(c["expected"]["outputs"]["contributing_peers"] == len(c["inputs"]["payloads"]) for c in aggregates)
    rejected = [c for c in cases if c["op"] == "prefix_dim" and "error" in c["expected"]]
    assert rejected and all(c["expected"]["error"] == "UnsupportedParameter" for c in rejected)
    for case in (c for c in cases if c["op"] == "receive"):   # a flawed frame is rejected, never counted
        outputs, flawed = case["expected"]["outputs"], any(f.startswith("flaw:") for f in case["flags"])
        assert sum(outputs["rejected"].values()) == flawed
        assert outputs["contributing_peers"] == len(case["inputs"]["frames"]) - flawed
    frames = [c for c in cases if c["op"] == "decode_frame"]
    assert all(("error" in c["expected"]) == any(f.startswith("flaw:") for f in c["flags"]) for c in frames)
    assert {c["expected"]["error"] for c in frames if "error" in c["expected"]} <= set(REASONS)


def test_every_tier_of_one_model_hashes_alike_and_every_hashed_field_changes_the_hash():
    made = [cases._schema_hash(None, index) for index in range(len(vectors.SCHEMA_FIELDS) + 4)]
    hashes = [conformance.answer({"id": "c", "op": "schema_hash", "inputs": inputs}, Path("."), {})
              for inputs, *_ in made]
    full, sliced, contradicting, changed = hashes[0], hashes[1:3], hashes[3], hashes[4:]
    assert all(h["outputs"] == full["outputs"] for h in sliced)
    assert contradicting["error"]["kind"] == "CheckpointError"
    assert len({h["outputs"]["hash"] for h in [full, *changed]}) == 1 + len(vectors.SCHEMA_FIELDS)


def test_every_chapter_case_pinned_in_the_align_properties_is_a_case(exported):
    from sim.align import CHAPTER_CASES
    pinned = [c for c in vectors.load(exported, "align_prefix_grad") if "pinned" in c["flags"]]
    shapes = set(CHAPTER_CASES)
    assert len(pinned) == 2 * len(shapes) >= 4   # each expanded and sliced
    for case in pinned:
        grad = conformance.resolve(case["inputs"]["grad"], exported, {})
        assert (case["inputs"]["name"], tuple(grad.shape)) in {(n, s) for n, f, l, _ in shapes for s in (f, l)}


def test_a_psyche_divergent_case_gives_both_readings_and_check_says_which_an_answer_is(tmp_path, exported):
    cases = vectors.load(exported)
    divergent = [c for c in cases if "psyche_divergent" in c["flags"]]
    assert {c["op"] for c in divergent} >= {"aggregate", "helper_indices", "quantize_1bit"}
    assert all(("psyche" in c["expected"]) == (c in divergent) for c in cases)
    # Where Psyche would have sent other pairs, the case carries them, and matsim's mathematics
    # on Psyche's own pairs is Psyche's reading (the divergence was in what is sent); elsewhere
    # matsim itself, held to Psyche's reading, fails exactly those cases, each as matsim's reading.
    other_pairs = {c["id"] for c in divergent if "inputs" in c["expected"]["psyche"]}
    assert {c["op"] for c in divergent if c["id"] in other_pairs} >= {"batch_decompress", "aggregate"}
    results = [vectors.run_case(InProcess(exported), case, exported, reading="psyche") for case in cases]
    failed = {r.case for r in results if r.status == "fail"}
    # (a tie among nonzero magnitudes is read by the values: another valid top-k passes)
    ties = {c["id"] for c in divergent if c["op"] == "compress" and "tie" in c["flags"]}
    assert failed <= {c["id"] for c in divergent} - other_pairs and failed >= {c["id"] for c in divergent} - other_pairs - ties
    assert all(r.other_reading and "matsim's reading" in r.reason for r in results if r.status == "fail")


def test_psyche_sends_an_all_zero_blocks_k_zeros_at_indices_libtorch_chooses_flagged_tie():
    """Psyche's compress calls libtorch's topk(k, largest, sorted=false): an all-zero block goes out
    as k exact zeros at k distinct indices of the block (not matsim's absent slot), which ones
    libtorch's choice among equal magnitudes: the case says so (tie)."""
    x, tensors = torch.zeros(8), {}
    case = store._case("c", "compress", ({"x": x, "chunk": 4, "topk": 2, "zero_blocks": "absent"},
                                           ["tie"] if cases._tied(x, 4, 2) else [], "",
                                           {"x": x, "chunk": 4, "topk": 2, "zero_blocks": "absent"}), 0, 0, tensors)
    assert {"psyche_divergent", "tie"} <= set(case["flags"]) and "psyche" in case["expected"]
    assert tensors["c/out/indices"].tolist() == [[4, 4], [4, 4]]      # matsim: the absent slot, block_numel
    chosen = tensors["c/psyche/indices"]
    assert all(len(set(block)) == 2 and all(0 <= i < 4 for i in block) for block in chosen.tolist())
    assert not tensors["c/out/values"].any() and not tensors["c/psyche/values"].any()


def test_the_reference_adapter_passes_every_case(tmp_path, exported):
    result = matsim_here("vectors", "check", str(exported), "--impl", REFERENCE, "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"] and all(r["status"] == "pass" for r in report["results"])


# Planted bugs (tests/planted_bugs.py) in ops the vectors export, and the op that shows each.
PLANTED = {"down_proj_sliced_on_rows": "align_prefix_grad", "substring_name_matching": "prefix_dim",
           "gradient_padded_at_the_front": "align_prefix_grad", "coeff_mean_divides_by_all_peers": "aggregate",
           "topk_keeps_the_smallest": "compress", "one_bit_zeros_sent_as_zero": "quantize_1bit",
           "error_feedback_dropped": "error_feedback", "helper_indices_from_the_whole_width": "helper_indices",
           "weight_decay_applied_twice": "apply_update", "sign_taken_before_the_mean": "aggregate",
           "suffix_divided_by_all_peers": "aggregate", "narrow_gradients_aligned_into_the_last_neurons": "aggregate",
           "helper_slab_placed_at_the_prefix": "align_sparse_grad", "nan_payload_accepted": "decode_frame",
           "rejected_payloads_counted_as_contributing": "receive", "duplicate_payload_applied_twice": "receive",
           "late_payload_accepted_next_round": "receive"}


class InProcess:
    """The reference adapter without the process: `answer` called directly (a planted bug is
    then planted here), for what the cases catch rather than how they travel."""
    def __init__(self, directory: Path):
        self.directory, self.files, self.ops = directory, {}, set(conformance.OPS)

    def ask(self, request: dict) -> dict:
        return json.loads(json.dumps(conformance.answer(request, self.directory, self.files)))


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_each_planted_bug_of_an_exported_op_fails_a_case(exported, monkeypatch, bug):
    plant(monkeypatch, bug)
    adapter = InProcess(exported)
    results = [vectors.run_case(adapter, case, exported) for case in vectors.load(exported, PLANTED[bug])]
    assert any(r.status == "fail" for r in results), [r.reason for r in results]


KILLERS = json.loads(vectors.KILLERS.read_text())


def test_every_planted_bug_of_an_exported_op_has_its_shrunk_killing_input_in_the_vectors():
    assert {k["bug"] for k in KILLERS} >= set(PLANTED)


@pytest.mark.parametrize("killer", KILLERS, ids=lambda k: k["bug"])
def test_each_killing_case_passes_on_matsim_and_fails_with_its_bug_planted(exported, monkeypatch, killer):
    (case,) = [c for c in vectors.load(exported, killer["op"]) if f"kills:{killer['bug']}" in c["flags"]]
    assert vectors.run_case(InProcess(exported), case, exported).status == "pass"
    plant(monkeypatch, killer["bug"])
    assert vectors.run_case(InProcess(exported), case, exported).status == "fail"


def test_the_planted_adapter_process_serves_with_its_bug(exported):
    results = vectors.check(exported, f"{sys.executable} -m tests.planted_adapter topk_keeps_the_smallest",
                            only="compress", timeout_s=HANG_GUARD_S)
    assert any(r.status == "fail" for r in results) and any(r.status == "pass" for r in results)


def _fake(tmp_path: Path, body: str) -> str:
    """An implementation that answers the hello, then behaves as `body` says."""
    script = tmp_path / "fake.py"
    script.write_text("import json, sys, time\n"
                      "print(json.dumps({'hello': {'ops': ['chunk_size', 'prefix_dim']}}), flush=True)\n"
                      "for line in sys.stdin:\n"
                      "    request = json.loads(line)\n"
                      "    if 'hello' in request:\n"
                      "        continue\n" + body)
    return f"{sys.executable} {script}"


@pytest.mark.parametrize("body, reason", [
    ("    sys.exit(3)\n", "the implementation exited"),
    ("    print('not json', flush=True)\n", "the answer is not JSON"),
    ("    print(json.dumps([1, 2]), flush=True)\n", "not a JSON object"),
    ("    time.sleep(3600)\n", "no answer within"),
])
def test_a_misbehaving_implementation_fails_its_cases_and_the_check_goes_on(tmp_path, exported, body, reason):
    hangs = "sleep" in body   # the hang is the test, an answer never comes: one case shows it
    results = vectors.check(exported, _fake(tmp_path, body), only="chunk_size", fail_fast=hangs,
                            timeout_s=1.0 if hangs else HANG_GUARD_S)
    assert len(results) == (1 if hangs else 4) and all(r.status == "error" and reason in r.reason for r in results)


def test_a_wrong_answer_fails_the_case_and_the_cli_exits_1(tmp_path, exported):
    wrong = _fake(tmp_path, "    print(json.dumps({'id': request['id'], 'outputs': {'size': -1}}), flush=True)\n")
    result = matsim_here("vectors", "check", str(exported), "--impl", wrong, "--only", "chunk_size",
                         "--report", str(tmp_path / "r.json"))
    assert result.returncode == 1 and "FAIL chunk_size-0000: outputs/size: -1, expected" in result.stdout
    failing = matsim_here("vectors", "check", str(exported), "--impl", wrong, "--only", "chunk_size", "--fail-fast",
                          "--report", str(tmp_path / "r.json"))
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 1 and failing.returncode == 1


def test_an_op_the_implementation_lacks_is_skipped_not_failed(tmp_path, exported):
    results = vectors.check(exported, _fake(tmp_path, "    pass\n"), only="compress", timeout_s=HANG_GUARD_S)
    assert results and all(r.status == "skipped" for r in results)


def _corrupt(directory: Path, how: str) -> None:
    if how == "version":
        manifest = json.loads((directory / "manifest.json").read_text())
        (directory / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    elif how == "truncated":
        data = (directory / "compress.safetensors").read_bytes()
        (directory / "compress.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "manifest":
        (directory / "manifest.json").write_text("{not json")


@pytest.mark.parametrize("how, fragment", [
    ("missing", "has no manifest.json"),
    ("version", "version 99 is not supported"),
    ("truncated", "the files of op 'compress' cannot be read"),
    ("manifest", "is not valid JSON"),
    ("command", "cannot be started"),
    ("hello", "did not answer the hello"),
    ("only", "--only 'median' is not an op"),
    ("reading", "--reading 'rust' is unknown: valid are matsim, psyche"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, exported, how, fragment):
    directory, impl, extra = tmp_path / "v", REFERENCE, []
    if how != "missing":
        directory = vectors.export(directory, seed=7, cases_per_op=1)
    _corrupt(directory, how)
    if how == "command":
        impl = "no-such-implementation --serve"
    if how == "hello":
        impl = f"{sys.executable} -c \"print('hi')\""
    if how == "only":
        extra = ["--only", "median"]
    if how == "reading":
        extra = ["--reading", "rust"]
    result = matsim_here("vectors", "check", str(directory), "--impl", impl, *extra)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr


def test_export_refuses_a_bad_case_count_and_leaves_nothing_half_written(tmp_path):
    result = matsim_here("vectors", "export", "--out", str(tmp_path / "v"), "--cases-per-op", "0")
    assert result.returncode == 2 and "--cases-per-op 0 is invalid" in result.stderr
    assert not any(tmp_path.iterdir())


def test_the_independent_numpy_implementation_passes_every_case_of_its_ops(tmp_path, exported):
    """vectors/numpy_impl/adapter.py imports neither sim nor torch: the format and protocol
    carry everything an implementation needs, and matsim's mathematics is checked twice."""
    source = (Path(__file__).parent.parent / "vectors" / "numpy_impl" / "adapter.py")
    assert "import torch" not in source.read_text() and "from sim" not in source.read_text()
    results = vectors.check(exported, f"{sys.executable} {source}", timeout_s=HANG_GUARD_S)
    ran = [r for r in results if r.status not in ("skipped", "unsupported")]
    assert {r.op for r in ran} >= {"prefix_dim", "align_prefix_grad", "align_sparse_grad", "chunk_size", "dct_encode",
                                   "dct_decode", "compress", "batch_decompress", "aggregate", "apply_update"}
    assert all(r.status == "pass" for r in ran), [(r.case, r.reason) for r in ran if r.status != "pass"]


def test_an_implementation_answers_unsupported_for_a_variant_it_lacks_and_check_counts_it_apart(tmp_path, exported):
    """The numpy implementation, written to FORMAT.md alone, has no AdamW apply rule: it answers
    those cases `unsupported`, which check counts apart from failures (exit 0)."""
    source = Path(__file__).parent.parent / "vectors" / "numpy_impl" / "adapter.py"
    results = vectors.check(exported, f"{sys.executable} {source}", only="apply_update", timeout_s=HANG_GUARD_S)
    adamw = {c["id"] for c in vectors.load(exported, "apply_update") if c["inputs"]["rule"] == "adamw"}
    assert adamw and {r.case for r in results if r.status == "unsupported"} == adamw
    assert all(r.status == "pass" for r in results if r.case not in adamw)
    result = matsim_here("vectors", "check", str(exported), "--impl", f"{sys.executable} {source}",
                         "--only", "apply_update", "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0 and "unsupported" in result.stdout
