#!/usr/bin/env bash
# Final loss per scenario, error/NaN counts, PASS/FAIL per criterion and loss_curves.png.
#   scripts/analyze_results.sh results/
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/matsim analyze "${1:-results}"
