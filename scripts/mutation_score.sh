#!/bin/sh
# Mutation score of sim/align.py, sim/aggregate.py, sim/distro.py and sim/wire.py against the
# fast suites ([tool.mutmut] in pyproject.toml). mutmut 3 works in ./mutants (git-ignored),
# resumes where an interrupted run stopped, and lists every mutant by status at the end;
# `mutmut show NAME` prints one. The `mutation` Hypothesis profile skips shrinking, so a
# killed mutant dies fast. A "timeout" is not counted as a kill: read it with `mutmut show`.
#   scripts/mutation_score.sh --max-children 2   # all four files (about 1900 mutants; 16 min on 2 cores)
#   scripts/mutation_score.sh "sim.align.*"   # one module's mutants
set -e
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make .venv/.installed
.venv/bin/python -m pip install -q "mutmut==3.8.1"
# mutmut forks one child per mutant from a process that has run torch: with torch's thread
# pool alive, a child can block forever on a lock one of the parent's threads held at the fork.
# One thread per process means no pool, so nothing to deadlock.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-mutation} .venv/bin/mutmut run "$@" || true
.venv/bin/python -m scripts.mutation_report
