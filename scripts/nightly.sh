#!/bin/sh
# The nightly job's steps (.github/workflows/nightly.yml calls this script), runnable here:
#   scripts/nightly.sh BUDGET_SECONDS [STEP ...]     steps: suite fuzz impl matrix power (default: all)
# - suite:  every property under the nightly profile (100x the ci examples);
# - fuzz:   HypoFuzz over the properties in the same example database, then its replay and
#           report (scripts/fuzz.sh; failures get records under results/failures/);
# - impl:   `matsim fuzz --impl` against the numpy implementation and, where $MATSIM_DEMO names
#           DeMo's demo.py, the DeMo adapter: what it finds is written under results/fuzz-impl/
#           as one-case vectors that `matsim vectors check` replays;
# - matrix: the chapter's scenario matrix on nanogpt-20m-chain (NIGHTLY_MATRIX_ROUNDS=N for a
#           shorter local run);
# - power:  the convergence criteria's false-alarm and detection rates (scripts/power.py).
# The budget is shared in the proportions suite 30, fuzz 20, impl 10, matrix 25, power 15 over the steps
# chosen; a step still running at the end of its share is stopped (SIGINT, then SIGKILL a minute
# later) and reported "cut". Everything lands under results/; results/nightly/summary.json says
# what each step did. Exit status 1 when a step failed (a cut step is not a failure).
set -u
cd "$(dirname "$0")/.."
budget=${1:?usage: scripts/nightly.sh BUDGET_SECONDS [suite fuzz impl matrix power]}
shift
[ $# -gt 0 ] || set -- suite fuzz impl matrix power
share() { case $1 in suite) echo 30 ;; fuzz) echo 20 ;; impl) echo 10 ;; matrix) echo 25 ;; power) echo 15 ;;
          *) echo "nightly: unknown step '$1': the steps are suite fuzz impl matrix power" >&2; exit 2 ;; esac; }
total=0
for step in "$@"; do total=$((total + $(share "$step"))) || exit 2; done
[ -x .venv/bin/python ] || make .venv/.installed || exit 2
mkdir -p results/nightly
summary=results/nightly/summary.json
printf '{"budget_seconds": %s, "steps": [' "$budget" >"$summary.tmp"
failed=0
separator=""
for step in "$@"; do
    seconds=$((budget * $(share "$step") / total))
    echo "=== nightly: $step ($seconds s) ==="
    start=$(date +%s)
    case $step in
        suite)  HYPOTHESIS_PROFILE=nightly timeout -s INT -k 60 "$seconds" .venv/bin/python -m pytest -n auto -q \
                    >results/nightly/suite.log 2>&1 ;;
        # HypoFuzz gets the share less the replay's and the report's: a fifth, at least 120 s.
        fuzz)   rest=$((seconds / 5 > 120 ? seconds / 5 : 120))
                timeout -s INT -k 60 "$seconds" sh scripts/fuzz.sh $((seconds > rest ? seconds - rest : 0)) ;;
        # Ten ops of the numpy implementation and seven DeMo expresses: the share split over them.
        impl)   ops=10; [ -z "${MATSIM_DEMO:-}" ] || ops=17
                per=$((seconds / (ops + 2)))
                timeout -s INT -k 60 "$seconds" .venv/bin/matsim fuzz --seconds "$per" --out results/fuzz-impl/numpy \
                    --impl ".venv/bin/python vectors/numpy_impl/adapter.py"
                code=$?
                if [ -n "${MATSIM_DEMO:-}" ]; then
                    timeout -s INT -k 60 "$seconds" .venv/bin/matsim fuzz --seconds "$per" --out results/fuzz-impl/demo \
                        --reading psyche --impl ".venv/bin/python vectors/demo_impl/adapter.py"
                    [ $? -eq 0 ] || code=1
                fi
                [ $code -eq 0 ] ;;
        matrix) timeout -s INT -k 60 "$seconds" .venv/bin/matsim matrix --config-path nanogpt-20m-chain \
                    --out results/nanogpt-20m-chain ${NIGHTLY_MATRIX_ROUNDS:+--rounds "$NIGHTLY_MATRIX_ROUNDS"} ;;
        power)  timeout -s INT -k 60 "$seconds" .venv/bin/python -m scripts.power --calibrate 50 \
                    --detect 10 --out results/power ;;
    esac
    code=$?
    used=$(($(date +%s) - start))
    case $code in
        0) status=passed ;;
        124|137) status=cut ;;
        *) status=failed; failed=1 ;;
    esac
    [ "$step" = suite ] && tail -n 3 results/nightly/suite.log
    echo "=== nightly: $step $status (exit $code) in $used s ==="
    printf '%s\n  {"step": "%s", "budget_seconds": %s, "seconds": %s, "exit": %s, "status": "%s"}' \
        "$separator" "$step" "$seconds" "$used" "$code" "$status" >>"$summary.tmp"
    separator=","
done
printf '\n]}\n' >>"$summary.tmp"
mv "$summary.tmp" "$summary"
cat "$summary"
exit $failed
