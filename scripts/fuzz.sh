#!/bin/sh
# Fuzzing of the property suites for a time budget, on every core, in the suite's own example
# database (.hypothesis/examples, or $MATSIM_EXAMPLES_DB): what it finds replays first under
# `pytest`. Three steps:
#  1. sweep: every property gets a few new random examples (the `sweep` profile), so each is
#     fuzzed whichever ones HypoFuzz reaches;
#  2. HypoFuzz, coverage-guided, on what is left of the budget: the properties in shards
#     (scripts/fuzz_targets.py) rotated by $MATSIM_FUZZ_SEED (default: today's date), one
#     HypoFuzz process per core working through its shards, a slice of the budget each;
#  3. replay: the properties replay the database under pytest (the `replay` profile), so each
#     failure found gets its record under results/failures/ and its `scripts/reproduce.sh`
#     line, and results/fuzz/report.json gets examples, behaviors and seconds per property.
#   scripts/fuzz.sh SECONDS [pytest selection]      (default: properties/; make fuzz)
# SECONDS 0: no fuzzing, only the replay and the report (of a database filled before).
# $MATSIM_PLANT plants a bug of tests/planted_bugs.py in every step alike.
# Exit status: the replay's (0: nothing failing in the database, 1: failures, see the records).
set -u
cd "$(dirname "$0")/.."
seconds=${1:?usage: scripts/fuzz.sh SECONDS [pytest selection]}
shift
[ $# -gt 0 ] || set -- properties/
[ -x .venv/bin/python ] || make .venv/.installed
out=${MATSIM_FUZZ_OUT:-results/fuzz}
procs=$(nproc)
mkdir -p "$out"
rm -f "$out"/hypofuzz-*.log "$out/sweep.xml"
case "$*" in  # one test id: no worker processes to start for it
    *::*) workers="-p no:xdist" ;;
    *) workers="-n auto" ;;
esac
if [ "$seconds" -gt 0 ]; then
    start=$(date +%s)
    echo "fuzz: sweep, a few random examples of every property"
    HYPOTHESIS_PROFILE=sweep .venv/bin/python -m pytest $workers -q -p no:cacheprovider \
        --junitxml="$out/sweep.xml" "$@" >"$out/sweep.log" 2>&1
    tail -n 1 "$out/sweep.log"
    left=$((seconds - ($(date +%s) - start)))
    per=${MATSIM_FUZZ_SHARDS_PER_PROCESS:-6}
    if [ "$left" -gt 0 ]; then
        seed=${MATSIM_FUZZ_SEED:-$(date +%Y%m%d)}
        .venv/bin/python -m scripts.fuzz_targets --shards $((procs * per)) --seed "$seed" "$@" >"$out/shards.txt"
        slice=$((left / per))
        [ "$slice" -ge 1 ] || slice=1
        echo "fuzz: HypoFuzz on $procs processes for $left s: $(wc -l <"$out/shards.txt") shards (seed $seed), $slice s each"
        p=0
        while [ "$p" -lt "$procs" ]; do
            (
                i=0
                while read -r shard; do
                    if [ $((i % procs)) -eq "$p" ]; then
                        # HypoFuzz runs until stopped: SIGINT at the slice, SIGKILL 30 s later if it lingers.
                        # shellcheck disable=SC2086
                        timeout -s INT -k 30 "$slice" .venv/bin/hypothesis fuzz -n 1 --no-dashboard -- $shard \
                            >>"$out/hypofuzz-$p.log" 2>&1
                    fi
                    i=$((i + 1))
                done <"$out/shards.txt"
            ) &
            p=$((p + 1))
        done
        wait
    fi
fi
echo "fuzz: replaying the example database under pytest"
HYPOTHESIS_PROFILE=replay .venv/bin/python -m pytest $workers -q -p no:cacheprovider "$@" >"$out/replay.log" 2>&1
status=$?
tail -n 3 "$out/replay.log"
.venv/bin/python -m scripts.fuzz_report --out "$out" --seconds "$seconds" "$@"
exit $status
