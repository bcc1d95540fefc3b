import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker (and the CLI subprocesses tests start): with
    # -n auto the workers already fill the cores, and OpenMP threads spinning on top of
    # each other made the suite ~10x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from properties import records  # noqa: E402
from properties.profiles import register_profiles  # noqa: E402
from sim.provenance import stamp  # noqa: E402

PROFILE = register_profiles()
RESULTS = Path(__file__).resolve().parent / "results"


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE}"


def pytest_configure(config):
    """MATSIM_PLANT=<bug> plants one bug of tests/planted_bugs.py for the whole session:
    how the reproduce workflow is shown on a real failure (tests/test_reproduce.py)."""
    bug = os.environ.get("MATSIM_PLANT")
    if bug:
        from tests.planted_bugs import plant
        config._matsim_plant = pytest.MonkeyPatch()
        plant(config._matsim_plant, bug)


def pytest_runtest_setup(item):
    records.describe()  # a record describes its own test's example, never a previous test's


def pytest_collection_modifyitems(items):
    for item in items:
        # One example-database key per test id, as HypoFuzz keys what it finds (Hypothesis's
        # pytest plugin does so only for parametrized tests): `make fuzz`'s failures replay here.
        # A private attribute: Hypothesis has no public way to add to a test's database key.
        inner = getattr(getattr(getattr(item, "obj", None), "hypothesis", None), "inner_test", None)
        if inner is not None:
            inner._hypothesis_internal_add_digest = item.nodeid.encode()
    records.apply_reproduction(items)  # only under properties/reproduce.py ($MATSIM_REPRODUCE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing Hypothesis test leaves a record and the one-line command that replays it."""
    report = (yield).get_result()
    if report.when == "call" and report.failed and getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        path = records.write_record(item.nodeid, report.longreprtext, PROFILE)
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
        report.sections.append(("reproduce", f"scripts/reproduce.sh {shown}"))


def pytest_unconfigure(config):
    # HypoFuzz collects the tests in a pytest session of its own, ends it, then fuzzes in the
    # same process: a bug planted for a fuzzing run stays planted after that session.
    hypofuzz = sys.modules.get("hypofuzz.detection")
    if getattr(config, "_matsim_plant", None) and not (hypofuzz and hypofuzz.in_hypofuzz_run()):
        config._matsim_plant.undo()


def pytest_terminal_summary(terminalreporter):
    """Time to detection of each planted bug (tests/test_planted_bugs.py), also under xdist."""
    found = {}
    for report in terminalreporter.stats.get("passed", []):
        props = dict(getattr(report, "user_properties", []))
        if "planted_bug" in props:
            found[props["planted_bug"]] = props["seconds_to_detection"]
    if not found:
        return
    median = statistics.median(found.values())
    terminalreporter.section("planted bugs: seconds to detection")
    for bug, seconds in sorted(found.items(), key=lambda item: item[1]):
        terminalreporter.write_line(f"{seconds:7.2f}  {bug}")
    terminalreporter.write_line(f"{median:7.2f}  median over {len(found)} bugs (goal: at most 10 s)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "planted_bugs.json").write_text(json.dumps(
        {**stamp(), "profile": PROFILE, "workers": getattr(terminalreporter.config.option, "numprocesses", None),
         "seconds_to_detection": found, "median_seconds": median}, indent=2, sort_keys=True))
