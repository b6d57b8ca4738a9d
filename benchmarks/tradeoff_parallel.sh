#!/usr/bin/env bash
# The trade-off benchmark at the issue's scale, one process per method, all at once.
#
# Same runs as `benchmarks/tradeoff.py` with its defaults (baseline: ResNet-20
# trained 15 epochs on all 60k images; budget: 3 epochs over a fixed 20k subset;
# targets 2x, 4x, 8x; two seeds at 4x and 8x for the best recipe and for
# Torch-Pruning magnitude pruning), but the methods run side by side: on a GPU
# machine the whole benchmark then takes minutes. Every process appends to one
# results JSON (under a file lock); `--render-only` then writes RESULTS.md and
# the plot from it.
#
#   DEVICE=cuda benchmarks/tradeoff_parallel.sh            # on a GPU machine
#   SMOKE=1 DEVICE=cpu RESULTS=/tmp/t.json CACHE=/tmp/c benchmarks/tradeoff_parallel.sh
#
# Environment: DEVICE (cuda), DATA (Fashion-MNIST idx folder), CACHE (baseline,
# data and run folders), RESULTS (the JSON), THREADS (torch threads per
# process), PYTHON, SMOKE=1 (tiny sizes, to rehearse the script).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-../shared/data/fashion-mnist}
CACHE=${CACHE:-benchmarks/.cache}
RESULTS=${RESULTS:-benchmarks/results/tradeoff_full.json}
THREADS=${THREADS:-2}
SEED1_TARGETS=${SEED1_TARGETS:-4,8}
LOGS="$CACHE/logs"
mkdir -p "$LOGS"
size=()
if [ "${SMOKE:-0}" = 1 ]; then
    size=(--baseline-epochs 1 --baseline-subset 512 --subset 256 --test-subset 256 --budget-epochs 1)
fi
common=(--data "$DATA" --cache-dir "$CACHE" --device "$DEVICE" --results "$RESULTS"
        --threads "$THREADS" --extra-seeds "" --no-render "${size[@]}")

echo "$(date -u +%T) baseline and results file"
"$PY" benchmarks/tradeoff.py "${common[@]}" --plot "$LOGS/prepare.png" --prepare-only || exit 1

declare -A jobs
launch() {  # launch NAME ARGS...: one tradeoff.py process, logged to $LOGS/NAME.log
    local name=$1
    shift
    "$PY" benchmarks/tradeoff.py "${common[@]}" --plot "$LOGS/$name.png" "$@" >"$LOGS/$name.log" 2>&1 &
    jobs[$name]=$!
}
for method in tl1-group group-lasso l1-group l0-group l1l2-group tp-magnitude tp-magnitude-kd tp-sparse; do
    launch "$method" --methods "$method"
done
launch tl1-group-seed1 --methods tl1-group --targets "$SEED1_TARGETS" --seeds 1
launch tp-magnitude-seed1 --methods tp-magnitude --targets "$SEED1_TARGETS" --seeds 1
echo "$(date -u +%T) ${#jobs[@]} processes running"

status=0
for name in "${!jobs[@]}"; do
    if wait "${jobs[$name]}"; then
        echo "$(date -u +%T) $name done"
    else
        echo "$(date -u +%T) $name FAILED (see $LOGS/$name.log):"
        tail -n 20 "$LOGS/$name.log"
        status=1
    fi
done
"$PY" benchmarks/tradeoff.py --results "$RESULTS" --render-only --no-render "${size[@]}" \
    --plot "${PLOT:-$CACHE/tradeoff_full.png}" || status=1
exit $status
