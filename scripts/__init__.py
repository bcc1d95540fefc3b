"""The checkout's measurement and maintenance scripts, run from the checkout's root as
modules (`.venv/bin/python -m scripts.power ...`), so they import sim, tests and properties
as the suite does."""
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def in_checkout(checkout: Path, module: str, argv: list[str]) -> str:
    """Run `python -m module --child ARGV` against another checkout (an earlier commit): its
    sim/, tests/ and properties/ are the ones imported, these scripts the ones that measure.
    Returns what the child printed on stdout (its measurement, as JSON); fails loudly."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(CHECKOUT)])}
    child = subprocess.run([sys.executable, "-m", module, "--child", *argv], cwd=checkout, env=env,
                           stdout=subprocess.PIPE, text=True)
    if child.returncode:
        raise SystemExit(f"{module} in {checkout}: exit {child.returncode}")
    return child.stdout
