#!/bin/sh
# Measure every published figure again, at this checkout's commit, then regenerate the docs'
# tables (python -m scripts.tables). Each step writes its stamped file under docs/data/.
#   scripts/figures.sh                    # every step (hours on 2 cores: power alone is most of it)
#   scripts/figures.sh matrix bench       # some of them
# Steps: matrix memory zero_blocks bandwidth round_off calibrate_faults shrink bug_paths
#        planted_bugs findings bench fuzz_vs_random mutation power psyche_configs (needs PSYCHE=checkout)
set -eu
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make .venv/.installed
py=.venv/bin/python
steps="${*:-matrix memory zero_blocks bandwidth round_off calibrate_faults shrink bug_paths planted_bugs findings bench fuzz_vs_random mutation power psyche_configs}"
for step in $steps; do
    echo "=== $step"
    case "$step" in
        matrix)  .venv/bin/matsim matrix --config-path ffn-small --out results/figures-matrix || true   # FAIL is a figure too
                 cp results/figures-matrix/analysis.json docs/data/matrix.json
                 cp results/figures-matrix/loss_curves.png docs/images/loss_curves.png ;;
        memory)  .venv/bin/matsim memory --tiers 0,1,2 --out results/figures-memory
                 cp results/figures-memory/memory.json docs/data/memory.json
                 cp results/figures-memory/memory.png docs/images/memory.png ;;
        zero_blocks|bandwidth|bug_paths|bench_report|fuzz_vs_random) $py -m "scripts.$step" ;;
        round_off)        $py -m scripts.round_off --examples 40 --out docs/data/round_off.json ;;
        calibrate_faults) $py -m scripts.calibrate_faults --out docs/data/fault_gap.json ;;
        shrink)           $py -m scripts.shrink_report --out docs/data/shrink_after.json ;;
        planted_bugs)     CI=true $py -m pytest -q -n auto tests/test_planted_bugs.py
                          cp results/planted_bugs.json docs/data/planted_bugs.json ;;
        findings)         $py -m scripts.findings ${PSYCHE:+--psyche "$PSYCHE"} ;;
        bench)            $py -m scripts.bench_report ;;
        mutation)         sh scripts/mutation_score.sh --max-children 2 ;;
        power)            $py -m scripts.power --calibrate 100 --detect 10 --write ;;
        psyche_configs)   $py -m scripts.psyche_configs "${PSYCHE:?psyche_configs needs PSYCHE=a psyche-elastic checkout}" \
                              --micro-batch-size 4 --write ;;
        *) echo "figures: unknown step $step" >&2; exit 2 ;;
    esac
done
$py -m scripts.tables
