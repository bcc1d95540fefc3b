"""The harness finds the bugs it exists for: every planted bug in tests/planted_bugs.py
makes the properties named for it fail, at the ci profile's example counts (or more, under
nightly) whatever profile runs the suite. Each test records its time to detection; the
session summary (root conftest.py) prints them and writes results/planted_bugs.json."""
import time

import pytest
from hypothesis import Phase, settings

from properties.profiles import CI_EXAMPLES
from tests.planted_bugs import BUGS, CATCHERS, plant, property_function


def ci_examples(active: int) -> int:
    """A property's example count under the ci profile, from its count under the active one
    (costly properties take a fixed fraction of the profile's count)."""
    return max(1, round(active * CI_EXAMPLES / settings.default.max_examples))


def test_the_catalog_has_at_least_12_bugs_each_with_its_catchers():
    assert len(BUGS) >= 12 and set(BUGS) == set(CATCHERS)
    for refs in CATCHERS.values():
        for ref in refs:
            test, case = property_function(ref)
            parametrized = {mark.args[0]: mark.args[1] for mark in getattr(test, "pytestmark", [])
                            if mark.name == "parametrize"}
            assert hasattr(test, "hypothesis") and set(case) == set(parametrized), ref
            assert all(value in map(str, parametrized[arg]) for arg, value in case.items()), ref


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_the_properties_catch_the_planted_bug(bug, monkeypatch, record_property):
    start = time.perf_counter()
    with monkeypatch.context() as patched:
        plant(patched, bug)
        for ref in CATCHERS[bug]:
            test, case = property_function(ref)
            # No example database (a failure that exists only under a planted bug must not be
            # replayed first by the next honest run) and no shrinking: detection is the question.
            # A private attribute: Hypothesis offers no public way to run an @given test under
            # other settings (@settings refuses a second application, and a profile is read when
            # each settings object is built, at import).
            own = test._hypothesis_internal_use_settings
            patched.setattr(test, "_hypothesis_internal_use_settings", settings(
                own, database=None, report_multiple_bugs=False, phases=[Phase.explicit, Phase.generate],
                max_examples=max(own.max_examples, ci_examples(own.max_examples))))
            # A catch is a failed assertion (or pytest's own failure), nothing else: a KeyError or a
            # health check that a planted bug provokes is the property breaking, not catching.
            with pytest.raises((AssertionError, pytest.fail.Exception)):
                test(**case)
    record_property("planted_bug", bug)
    record_property("seconds_to_detection", time.perf_counter() - start)
