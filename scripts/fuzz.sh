#!/bin/sh
# Coverage-guided fuzzing of the property suites with HypoFuzz for a time budget, on every core,
# in the suite's own example database (.hypothesis/examples, or $MATSIM_EXAMPLES_DB): what it
# finds replays first under `pytest`. Afterwards the properties replay that database under
# pytest (the `replay` profile), so each failure HypoFuzz found gets its record under
# results/failures/ and its `scripts/reproduce.sh` line, and results/fuzz/ gets HypoFuzz's report.
#   scripts/fuzz.sh SECONDS [pytest selection]      (default: properties/; make fuzz)
# SECONDS 0: no fuzzing, only the replay and the report (of a database HypoFuzz filled before).
# $MATSIM_PLANT plants a bug of tests/planted_bugs.py in the fuzzing and the replay alike.
# Exit status: the replay's (0: nothing failing in the database, 1: failures, see the records).
set -u
cd "$(dirname "$0")/.."
seconds=${1:?usage: scripts/fuzz.sh SECONDS [pytest selection]}
shift
[ $# -gt 0 ] || set -- properties/
[ -x .venv/bin/python ] || make .venv/.installed
out=${MATSIM_FUZZ_OUT:-results/fuzz}
mkdir -p "$out"
if [ "$seconds" -gt 0 ]; then
    echo "fuzz: HypoFuzz on $(nproc) processes for $seconds s over $*"
    # HypoFuzz runs until stopped: SIGINT at the budget, SIGKILL a minute later if it lingers.
    timeout -s INT -k 60 "$seconds" .venv/bin/hypothesis fuzz -n "$(nproc)" --no-dashboard -- "$@" \
        >"$out/hypofuzz.log" 2>&1
fi
echo "fuzz: replaying the example database under pytest"
case "$*" in  # one test id: no worker processes to start for it
    *::*) workers="-p no:xdist" ;;
    *) workers="-n auto" ;;
esac
HYPOTHESIS_PROFILE=replay .venv/bin/python -m pytest $workers -q -p no:cacheprovider "$@" >"$out/replay.log" 2>&1
status=$?
tail -n 3 "$out/replay.log"
.venv/bin/python -m scripts.fuzz_report --out "$out" "$@"
exit $status
