#!/usr/bin/env bash
# --target binary against --target boundary with the demo's recipe (the Makefile's `demo`), seeds 0 and 1,
# judged on the validation split only: every run is --no-test, and experiments/boundary_target.py scores
# each run's best.pt on the validation images (instance metrics and Dice, over the set and per image,
# the classical pipeline beside) into experiments/results/boundary_target/validation.md / .json.
# Resumable: a finished run (its `done`) is skipped, an interrupted one continues from its last.pt.
# Each run is the demo's training (under 3 minutes on the 2-core development machine, README), so
# about 10 minutes for the four.
# Smoke test: EPOCHS=1 ITERS=1 RUNS=/tmp/bt OUT=/tmp/bt-results bash experiments/boundary_target.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/boundary_target}
OUT=${OUT:-experiments/results/boundary_target}
SEEDS=${SEEDS:-0 1}
TARGETS=${TARGETS:-binary boundary}
EPOCHS=${EPOCHS:-45}
ITERS=${ITERS:-10}
RECIPE=(--data data/dsb2018_sample --preset small --method cdcl --labeled-fraction 1/2 --epochs "$EPOCHS"
        --iters-per-epoch "$ITERS" --unsup-start-epoch 4 --lr 1e-3 --ema-alpha 0.99 --threads 2)
for seed in $SEEDS; do  # seed by seed, so that the first paired difference comes early
    for target in $TARGETS; do
        out=$RUNS/$target-seed$seed
        [ -f "$out/done" ] && continue
        "$PY" train.py "${RECIPE[@]}" --target "$target" --seed "$seed" --out "$out" --resume auto --no-test \
            --no-progress --overlays 0
        touch "$out/done"
    done
done
"$PY" experiments/boundary_target.py --runs "$RUNS" --out "$OUT" --threads 2
