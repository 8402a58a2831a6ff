#!/usr/bin/env bash
# How long the demo trains, and how its nuclei are decoded, chosen on the VALIDATION split only.
# The demo's recipe (the Makefile's `demo`) at 45 and 90 epochs of 10 steps, seeds 0-2, every run
# --no-test; then experiments/tune_instances.py scores every decoding of its grid on the 12 validation
# images for each budget (the mean over the three seeds), and experiments/demo_budget.py puts the
# budgets side by side (best validation Dice, the goal metrics of each budget's best decoding and of
# the decodings the choice is between) in OUT/results.md / .json.
# Resumable: a finished run (its `done`) is skipped, an interrupted one continues from its last.pt.
# A 90-epoch run takes about 3.5 minutes on the 2-core development machine, a 45-epoch one half that.
# Smoke test: BUDGETS=1 SEEDS=0 ITERS=1 RUNS=/tmp/db OUT=/tmp/db-results bash experiments/demo_budget.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/demo_budget}
OUT=${OUT:-experiments/results/demo_budget}
SEEDS=${SEEDS:-0 1 2}
BUDGETS=${BUDGETS:-45 90}
ITERS=${ITERS:-10}
RECIPE=(--data data/dsb2018_sample --preset small --method cdcl --labeled-fraction 1/2 --iters-per-epoch "$ITERS"
        --unsup-start-epoch 4 --lr 1e-3 --ema-alpha 0.99 --threads 2)
for epochs in $BUDGETS; do
    for seed in $SEEDS; do
        out=$RUNS/e$epochs-seed$seed
        [ -f "$out/done" ] && continue
        "$PY" train.py "${RECIPE[@]}" --epochs "$epochs" --seed "$seed" --out "$out" --resume auto --no-test \
            --no-progress --overlays 0
        touch "$out/done"
    done
done
for epochs in $BUDGETS; do
    checkpoints=()
    for seed in $SEEDS; do checkpoints+=("$RUNS/e$epochs-seed$seed/best.pt"); done
    "$PY" experiments/tune_instances.py --checkpoint "${checkpoints[@]}" --out "$OUT/e$epochs" --threads 2
done
"$PY" experiments/demo_budget.py --runs "$RUNS" --out "$OUT"
