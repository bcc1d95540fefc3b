#!/usr/bin/env bash
# The verification chapter's test matrix: unit tests, 0,0,0 / 0,1,1 / 0,0,1 / 0,1,1,1 (+ the
# 4-peer oracle), then the analysis. Extra arguments go to `matsim matrix`, e.g.
#   scripts/run_matformer_tests.sh --config-path nanogpt-20m-run --rounds 50 --out results/20m
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/matsim ] || make .venv/.installed
echo "=== Unit tests ==="
.venv/bin/python -m pytest -q -p no:cacheprovider -p no:xdist tests/test_matformer_unit.py
exec .venv/bin/matsim matrix "$@"
