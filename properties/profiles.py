"""Hypothesis profiles, registered once for every suite (root conftest.py).

- dev: quick local iteration.
- ci: every push; random seeds, so each push fuzzes new inputs.
- nightly: 100x the ci examples, no deadline.
HYPOTHESIS_PROFILE picks one; otherwise `ci` when CI=true, else `dev`.
Examples persist in one directory database under .hypothesis/ at the repo
root, shared by every pytest-xdist worker, so a failure found in any worker
is replayed first on the next run.
"""
import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DB = Path(os.environ.get("MATSIM_EXAMPLES_DB", REPO_ROOT / ".hypothesis" / "examples"))
CI_EXAMPLES = 200
PROFILES = {
    "dev": dict(max_examples=50),
    "ci": dict(max_examples=CI_EXAMPLES),
    "nightly": dict(max_examples=100 * CI_EXAMPLES),
}


def register_profiles() -> str:
    database = DirectoryBasedExampleDatabase(str(EXAMPLE_DB))
    for name, options in PROFILES.items():
        settings.register_profile(
            name, database=database, deadline=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow], **options)
    default = "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
    chosen = os.environ.get("HYPOTHESIS_PROFILE", default)
    if chosen not in PROFILES:
        raise SystemExit(f"HYPOTHESIS_PROFILE {chosen!r} is unknown: valid profiles are {', '.join(PROFILES)}")
    settings.load_profile(chosen)
    return chosen


def scaled(fraction: float) -> settings:
    """Settings for a costly property: `fraction` of the active profile's examples."""
    return settings(max_examples=max(1, int(settings.default.max_examples * fraction)))
