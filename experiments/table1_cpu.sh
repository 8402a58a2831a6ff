#!/usr/bin/env bash
# The CPU Table 1 of docs/training.md, in the order it was built (each step resumes: finished runs
# are skipped). DSB = ../shared/nuclei/dsb2018/stage1_train, MONUSEG = ../shared/nuclei/monuseg.
# Budget per run: 10 epochs x 30 steps of batch 8 labeled + 8 unlabeled 128-pixel native-resolution
# crops, small preset, the demo's optimiser and augmentation settings, two threads.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DSB=${DSB:-../shared/nuclei/dsb2018/stage1_train}
MONUSEG=${MONUSEG:-../shared/nuclei/monuseg}
OUT=${OUT:-experiments/results/table1}
RUNS=${RUNS:-runs/table1}
BUDGET=(--epochs 10 --iters-per-epoch 30 --unsup-start-epoch 2 --lr 1e-3 --ema-alpha 0.99 --threads 2 --val-every 2 --overlays 0)
t1() {  # name, dataset, folder, fraction, methods, seeds...
    local name=$1 ds=$2 data=$3 frac=$4 methods=$5; shift 5
    $PY experiments/table1.py --data "$data" --dataset "$ds" --fraction "$frac" --methods $methods \
        --seeds "$@" --out "$RUNS/$name" -- "${BUDGET[@]}"
    mkdir -p "$OUT/$name"
    cp "$RUNS/$name/results.md" "$RUNS/$name/runs.csv" "$RUNS/$name/results.json" "$OUT/$name/"
}
STAGES=${STAGES:-"dsb-1_32-a dsb-1_8 dsb-1_32-b monuseg-1_8"}
for s in $STAGES; do
    case $s in
        dsb-1_32-a) t1 dsb-1_32 dsb "$DSB" 1/32 "suponly meanteacher cdcl" 0 1 2 ;;
        dsb-1_8) t1 dsb-1_8 dsb "$DSB" 1/8 "suponly meanteacher cdcl" 0 1 2 ;;
        dsb-1_32-b) t1 dsb-1_32 dsb "$DSB" 1/32 "suponly meanteacher cdcl" 0 1 2 3 4 ;;
        monuseg-1_8) t1 monuseg-1_8 monuseg "$MONUSEG" 1/8 "suponly cdcl" 0 1 2 ;;
    esac
done
