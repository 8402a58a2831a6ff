#!/usr/bin/env bash
# The CDCL levers of docs/training.md: CDCL at DSB 1/32 with the CPU Table 1 budget and one change
# each, seeds 0 and 1, judged on validation only (--no-test). Resumable (--resume auto).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DSB=${DSB:-../shared/nuclei/dsb2018/stage1_train}
RUNS=${RUNS:-runs/levers}
BUDGET=(--epochs 10 --iters-per-epoch 30 --unsup-start-epoch 2 --lr 1e-3 --ema-alpha 0.99 --threads 2 --val-every 2 --overlays 0)
VARIANTS=${VARIANTS:-"grid4 wcontr0.3 wcontr0.03 start5 memory4"}
flags() {
    case $1 in
        grid4) echo "--grid 4" ;;          # 32 x 32-pixel patches (4 x 4 features) instead of 16 x 16
        wcontr0.3) echo "--w-contr 0.3" ;;
        wcontr0.03) echo "--w-contr 0.03" ;;
        start5) echo "--unsup-start-epoch 5" ;;
        memory4) echo "--memory 4" ;;       # the bank holds the teacher pixels of the last 4 steps
    esac
}
for v in $VARIANTS; do
    for seed in ${SEEDS:-0 1}; do
        out=$RUNS/$v-seed$seed
        # shellcheck disable=SC2046
        $PY train.py --data "$DSB" --dataset dsb --method cdcl --labeled-fraction 1/32 --seed "$seed" \
            --split-seed 0 --preset small --out "$out" --resume auto --no-progress --no-test "${BUDGET[@]}" $(flags "$v")
    done
done
