#!/usr/bin/env bash
# The trade-off benchmark at the issue's scale on a 2-core CPU: two tradeoff.py
# processes side by side (one thread each), appending to one results JSON.
# The first waits for (or trains) the 15-epoch baseline; the second waits for it too.
# Core 1: tl1-group and Torch-Pruning magnitude at 4x, 8x, 2x, then l1-group, then the
#         second seed of tl1-group, tp-magnitude and tp-magnitude-kd at 4x and 8x, then
#         tl1-group-eq (tl1-group asked for tp-magnitude's reached MACs) at both seeds, then
#         the second seed of tp-magnitude and tl1-group-eq at 2x.
# Core 2: Torch-Pruning magnitude with compressor's distillation, tp-sparse, then the
#         other recipes, then the second seed of l0-group and l1l2-group at 8x.
# REDO="tl1-group,..." drops those methods' recorded runs first (after a library change).
# Render RESULTS.md afterwards: .venv/bin/python benchmarks/tradeoff.py --render-only
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=${PYTHON:-.venv/bin/python}
T="benchmarks/tradeoff.py --threads 1 --extra-seeds="
LOGS=benchmarks/.cache
mkdir -p $LOGS
( $PY $T --methods tl1-group,tp-magnitude --targets 4,8,2 --no-render --redo "${REDO:-}" \
  && $PY $T --methods l1-group --targets 4,8,2 --no-render \
  && $PY $T --methods tl1-group,tp-magnitude --targets 4,8 --seeds 1 --no-render \
  && $PY $T --methods tp-magnitude-kd --targets 4,8 --seeds 1 --no-render \
  && $PY $T --methods tl1-group-eq --targets 4,8,2 --no-render \
  && $PY $T --methods tl1-group-eq --targets 4,8 --seeds 1 --no-render \
  && $PY $T --methods tp-magnitude,tl1-group-eq --targets 2 --seeds 1 --no-render ) > $LOGS/tradeoff_p1.log 2>&1 &
sleep 90  # let the first process write the results file (and drop the REDO runs)
( $PY $T --methods tp-magnitude-kd,tp-sparse --targets 4,8,2 --no-render \
  && $PY $T --methods group-lasso,l0-group,l1l2-group --targets 4,8,2 --no-render \
  && $PY $T --methods l0-group,l1l2-group --targets 8 --seeds 1 --no-render ) > $LOGS/tradeoff_p2.log 2>&1 &
wait
