#!/bin/sh
# The origin's stress scenarios on matsim's testnet (scripts/stress.py), as Psyche's
# scripts/stress_test.sh takes them:
#   scripts/stress_test.sh [basic|latency|packet-loss|churn|combined|all]
# Environment: SEED (42), DURATION (seconds, 300), NUM_CLIENTS (4), CONFIG_PATH (nanogpt-20m-run),
# TIERS (0,1,1,1), and ROUNDS (matsim's: a fixed number of rounds, so a run is the same on any machine).
set -e
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make .venv/.installed
exec .venv/bin/python -m scripts.stress "${1:-basic}"
