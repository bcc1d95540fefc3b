"""Conformance vectors: matsim's cases as files any implementation can run (vectors/FORMAT.md).

- cases.py: what each op's cases draw, and Psyche's readings;
- store.py: `export` writes a deterministic directory, `load` reads one;
- adapter.py: an implementation under test, as a process speaking the protocol;
- check.py: `check` runs every case through it and compares the answers.
"""
from sim.vectors.cases import CASES, KILLERS, NAMES, NEAR_MISSES, SCHEMA_FIELDS
from sim.vectors.check import Result, check, compare, run_case
from sim.vectors.store import MANIFEST, VectorsError, export, load

__all__ = ["CASES", "KILLERS", "MANIFEST", "NAMES", "NEAR_MISSES", "SCHEMA_FIELDS", "Result", "VectorsError", "check",
           "compare", "export", "load", "run_case"]
