#!/usr/bin/env bash
# Why the unlabeled branch does not help (docs/training.md): mean teacher at DSB 1/32 with the CPU
# Table 1 budget and one lever changed at a time, seeds 0 and 1, judged on validation only
# (--no-test), validated every epoch so the curve after the branch starts is seen. Every run logs the
# teacher's pseudo-label accuracy against the hidden labels and the teacher's validation Dice.
# Resumable (--resume auto); `experiments/semi_levers.py` tabulates the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DSB=${DSB:-../shared/nuclei/dsb2018/stage1_train}
RUNS=${RUNS:-runs/semi_levers}
BUDGET=(--epochs 10 --iters-per-epoch 30 --unsup-start-epoch 2 --lr 1e-3 --ema-alpha 0.99 --threads 2 --val-every 1 --overlays 0)
VARIANTS=${VARIANTS:-"suponly mt mt-thr95 mt-soft mt-wcons0.1 mt-bntrain mt-nophoto mt-start5"}
flags() {
    case $1 in
        suponly) echo "--method suponly" ;;
        mt) echo "--method meanteacher" ;;
        mt-thr95) echo "--method meanteacher --cons-threshold 0.95" ;;
        mt-thr90) echo "--method meanteacher --cons-threshold 0.9" ;;
        mt-soft) echo "--method meanteacher --cons-target soft" ;;
        mt-wcons0.1) echo "--method meanteacher --w-cons 0.1" ;;
        mt-bntrain) echo "--method meanteacher --teacher-bn train" ;;
        mt-bnema) echo "--method meanteacher --teacher-bn ema" ;;
        mt-nophoto) echo "--method meanteacher --no-strong-photometric" ;;
        mt-start5) echo "--method meanteacher --unsup-start-epoch 5" ;;
        mt-bnema-thr95) echo "--method meanteacher --teacher-bn ema --cons-threshold 0.95" ;;
        mt-cutmix) echo "--method meanteacher --strong-cutmix" ;;
        mt-bnema-cutmix) echo "--method meanteacher --teacher-bn ema --strong-cutmix" ;;
        mt-bnema-cutmix-thr95) echo "--method meanteacher --teacher-bn ema --strong-cutmix --cons-threshold 0.95" ;;
        suponly-bnm0.01) echo "--method suponly --bn-momentum 0.01" ;;
        mt-bnema-bnm0.01) echo "--method meanteacher --teacher-bn ema --bn-momentum 0.01" ;;
        mt-bnema-thr95-bnm0.01) echo "--method meanteacher --teacher-bn ema --cons-threshold 0.95 --bn-momentum 0.01" ;;
        cdcl) echo "--method cdcl" ;;
        cdcl-bnema) echo "--method cdcl --teacher-bn ema" ;;
        cdcl-bnema-cutmix) echo "--method cdcl --teacher-bn ema --strong-cutmix" ;;
        mt-ema0.999) echo "--method meanteacher --ema-alpha 0.999" ;;
        *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
}
for v in $VARIANTS; do
    for seed in ${SEEDS:-0 1}; do
        out=$RUNS/$v-seed$seed
        [ -f "$out/done" ] && continue
        # shellcheck disable=SC2046
        $PY train.py --data "$DSB" --dataset dsb --labeled-fraction 1/32 --seed "$seed" --split-seed 0 \
            --preset small --out "$out" --resume auto --no-progress --no-test "${BUDGET[@]}" $(flags "$v")
        touch "$out/done"
    done
done
