"""Hypothesis profiles, registered once for every suite (root conftest.py).

- dev: quick local iteration.
- ci: every push; random seeds, so each push fuzzes new inputs; no explain phase.
- nightly: 100x the ci examples, no deadline.
- mutation: dev's examples, no shrinking and no database (scripts/mutation_score.sh):
  a mutant only has to make a property fail, and each of ~1800 mutants runs the suites.
- replay: nothing new, only the pinned examples and what the database holds (make fuzz).
- sweep: a few new examples of every property, no shrinking past the first failure's (make
  fuzz's first step: every property gets examples, whichever HypoFuzz reaches).
HYPOTHESIS_PROFILE picks one; otherwise `ci` when CI=true, else `dev`.

The example database and pytest-xdist: every worker process opens the same
directory database (.hypothesis/examples at the repo root, or
$MATSIM_EXAMPLES_DB). Writes are one file per example, so workers never clash.
A failure found in a worker is shrunk in that worker, reported through the
controller like any failure, saved to the database (and recorded under
results/failures/, see properties/records.py), and replayed first by whichever
worker runs that test next time, before any new example is generated.

MATSIM_SHARED_DB=owner/repo adds, read-only, the database the nightly job
uploads as the artifact `hypothesis-example-db` (needs GITHUB_TOKEN): a
developer's run then replays what the nightly fuzzing found.
"""
import os
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import (DirectoryBasedExampleDatabase, GitHubArtifactDatabase, MultiplexedDatabase,
                                 ReadOnlyDatabase)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DB = Path(os.environ.get("MATSIM_EXAMPLES_DB", REPO_ROOT / ".hypothesis" / "examples"))
CI_EXAMPLES = 200
SWEEP_EXAMPLES = 10   # scaled() properties get their fraction of it, at least one
PROFILES = {
    "dev": dict(max_examples=50),
    # No explain phase: after shrinking it reruns the failing example many times over (each a
    # whole simulation for the run properties); a red CI run reports sooner, and its record's
    # `scripts/reproduce.sh` line is how a developer looks closer.
    "ci": dict(max_examples=CI_EXAMPLES, phases=tuple(p for p in Phase if p is not Phase.explain)),
    "nightly": dict(max_examples=100 * CI_EXAMPLES),
    "mutation": dict(max_examples=50, phases=(Phase.explicit, Phase.generate)),
    # Only what the database holds (scripts/fuzz.sh): HypoFuzz's failures replay under pytest,
    # which writes their records.
    "replay": dict(max_examples=CI_EXAMPLES, phases=(Phase.explicit, Phase.reuse)),
    "sweep": dict(max_examples=SWEEP_EXAMPLES, phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)),
}


def example_database():
    local = DirectoryBasedExampleDatabase(str(EXAMPLE_DB))
    shared = os.environ.get("MATSIM_SHARED_DB")
    if not shared:
        return local
    owner, _, repo = shared.partition("/")
    if not owner or not repo:
        raise SystemExit(f"MATSIM_SHARED_DB {shared!r} is not owner/repo")
    return MultiplexedDatabase(local, ReadOnlyDatabase(GitHubArtifactDatabase(owner, repo, "hypothesis-example-db")))


def register_profiles() -> str:
    database = example_database()
    # Hypothesis's own defaults as the parent, never the profile active now: with CI set that is
    # Hypothesis's built-in "ci", whose derandomize=True made every push replay one fixed set of
    # inputs (and HypoFuzz refuses derandomized tests).
    defaults = settings.get_profile("default")
    for name, options in PROFILES.items():
        settings.register_profile(
            name, parent=defaults, database=None if name == "mutation" else database, deadline=None,
            print_blob=True, suppress_health_check=[HealthCheck.too_slow], **options)
    default = "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
    chosen = os.environ.get("HYPOTHESIS_PROFILE", default)
    if chosen not in PROFILES:
        raise SystemExit(f"HYPOTHESIS_PROFILE {chosen!r} is unknown: valid profiles are {', '.join(PROFILES)}")
    settings.load_profile(chosen)
    return chosen


def scaled(fraction: float) -> settings:
    """Settings for a costly property: `fraction` of the active profile's examples."""
    return settings(max_examples=max(1, int(settings.default.max_examples * fraction)))
