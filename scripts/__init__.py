"""The checkout's measurement and maintenance scripts, run from the checkout's root as
modules (`.venv/bin/python -m scripts.power ...`), so they import sim, tests and properties
as the suite does."""
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
