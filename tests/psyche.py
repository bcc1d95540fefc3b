"""The origin's own files, for the tests that hold matsim to them: a psyche-elastic checkout
given as $MATSIM_PSYCHE (e.g. a clone of plugyawn/psyche-elastic). Without it, those tests
skip and say so; nothing of Psyche's is copied into this repository."""
import os
from pathlib import Path

import pytest


def checkout() -> Path:
    """The checkout's root, or a skip naming what is missing."""
    root = os.environ.get("MATSIM_PSYCHE")
    if not root:
        pytest.skip("needs a psyche-elastic checkout: set MATSIM_PSYCHE to its root")
    path = Path(root)
    if not (path / "shared").is_dir():
        pytest.skip(f"MATSIM_PSYCHE={root} is not a psyche-elastic checkout (no shared/ folder)")
    return path


def source(relative: str) -> Path:
    """One file of the checkout, or a skip naming it."""
    path = checkout() / relative
    if not path.is_file():
        pytest.skip(f"the psyche-elastic checkout has no {relative}")
    return path
