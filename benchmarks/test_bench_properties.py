"""Examples per second of the pure-tensor alignment properties (goal: at least 500/s on
one core), against the bare baseline of drawing the same examples and doing nothing:
the ratio is what the laws themselves cost on top of Hypothesis's generation."""
import statistics
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from properties import test_align
from properties.strategies import mlp_grad_cases, mlp_names

EXAMPLES = 500
FAST = settings(max_examples=EXAMPLES, database=None, deadline=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))

PROPERTIES = {
    "prefix_dim": (test_align.test_prefix_dim_is_rows_for_gate_up_and_columns_for_down_weight,
                   (mlp_names(kinds=("weight", "bias")),)),
    "expand": (test_align.test_expanding_keeps_the_prefix_and_zero_fills_the_tail, (mlp_grad_cases(), st.data())),
    "round trip": (test_align.test_expand_then_slice_round_trips_exactly, (mlp_grad_cases(), st.data())),
}


def rerun(test):
    """The property under FAST settings (its own @given and body, a fresh settings object)."""
    return FAST(given(*PROPERTIES[test][1])(PROPERTIES[test][0].hypothesis.inner_test))


def bare(test):
    strategies = PROPERTIES[test][1]
    return FAST(given(st.tuples(*strategies))(lambda drawn: None))


@pytest.mark.parametrize("test", sorted(PROPERTIES))
@pytest.mark.parametrize("what", ["bare-generation", "property"])
def test_bench_alignment_examples_per_second(benchmark, test, what):
    benchmark.group = f"alignment property '{test}', {EXAMPLES} examples"
    run, seconds = rerun(test) if what == "property" else bare(test), []

    def timed():  # our own clock too: under xdist pytest-benchmark is off and runs this once
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)

    benchmark.pedantic(timed, rounds=3, warmup_rounds=1)
    per_second = EXAMPLES / statistics.median(seconds)
    benchmark.extra_info["examples_per_second"] = per_second
    print(f"\n{test} {what}: {per_second:,.0f} examples/s")
    assert per_second > 0
