#!/bin/sh
# A command while a competing busy loop per core keeps every core busy: a red run here is a
# test that depends on the machine's speed, and the time against a quiet run is how the work
# shares the cores it loses. Prints the command's time and exit status; the busy loops are
# started and stopped by this script, by their own pids.
#   scripts/under_load.sh [pytest args]      the ci-profile suite (default: all of it, -n auto)
#   scripts/under_load.sh -- COMMAND ...     any command, e.g. scripts/under_load.sh -- make run
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
if [ "${1:-}" = "--" ]; then
    shift
    "$@"
else
    CI=true .venv/bin/python -m pytest -n auto -q "$@"
fi
status=$?
echo "under_load: $cores busy loops, exit $status in $(( $(date +%s) - start )) s: ${*:-the ci suite}"
exit $status
