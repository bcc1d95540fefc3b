#!/bin/sh
# The ci-profile suite while a competing busy loop per core keeps every core busy: a red
# run here is a test that depends on the machine's speed. Prints the suite's time and exit
# status; the busy loops are started and stopped by this script, by their own pids.
#   scripts/under_load.sh [pytest args]        (default: the whole suite, -n auto)
set -u
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make .venv/.installed
cores=$(nproc)
pids=""
for _ in $(seq "$cores"); do
    python3 -c "while True: pass" &
    pids="$pids $!"
done
trap 'kill $pids 2>/dev/null' EXIT INT TERM
start=$(date +%s)
CI=true .venv/bin/python -m pytest -n auto -q "$@"
status=$?
echo "under_load: $cores busy loops, suite exit $status in $(( $(date +%s) - start )) s"
exit $status
