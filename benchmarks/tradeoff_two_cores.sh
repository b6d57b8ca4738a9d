#!/usr/bin/env bash
# The trade-off benchmark at the issue's scale on a 2-core CPU: two tradeoff.py
# processes side by side (one thread each), appending to one results JSON.
# The first waits for (or trains) the 15-epoch baseline; the second waits for it too.
# Core 1: tl1-group and Torch-Pruning magnitude at 4x, 8x, 2x, then their second seed at 4x and 8x.
# Core 2: group-lasso and tp-sparse, then the other recipes.
# Render RESULTS.md afterwards: .venv/bin/python benchmarks/tradeoff.py --render-only
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=${PYTHON:-.venv/bin/python}
T="benchmarks/tradeoff.py --threads 1 --extra-seeds="
LOGS=benchmarks/.cache
mkdir -p $LOGS
( $PY $T --methods tl1-group,tp-magnitude --targets 4,8,2 --no-render \
  && $PY $T --methods tl1-group,tp-magnitude --targets 4,8 --seeds 1 --no-render ) > $LOGS/tradeoff_p1.log 2>&1 &
sleep 90  # let the first process write the results file
( $PY $T --methods group-lasso,tp-sparse --targets 4,8,2 --no-render \
  && $PY $T --methods l1-group,l0-group,l1l2-group --targets 4,8,2 --no-render ) > $LOGS/tradeoff_p2.log 2>&1 &
wait
