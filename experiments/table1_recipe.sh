#!/usr/bin/env bash
# Table 1 with the unlabeled-branch recipe chosen on validation (docs/training.md: --teacher-bn ema
# --cons-threshold 0.95, now the defaults), every method validated every epoch so that each run's
# test checkpoint is its best validation epoch. Resumable: finished runs are skipped; the tables are
# rewritten after every run and copied into experiments/results/table1-recipe/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DSB=${DSB:-../shared/nuclei/dsb2018/stage1_train}
MONUSEG=${MONUSEG:-../shared/nuclei/monuseg}
OUT=${OUT:-experiments/results/table1-recipe}
RUNS=${RUNS:-runs/table1-recipe}
BUDGET=(--epochs 10 --iters-per-epoch 30 --unsup-start-epoch 2 --lr 1e-3 --ema-alpha 0.99 --threads 2 --val-every 1 --overlays 0)
t1() {  # name, dataset, folder, fraction, extra train.py flags, seeds...
    local name=$1 ds=$2 data=$3 frac=$4 extra=$5; shift 5
    local seeds=()
    for seed in "$@"; do  # one more seed at a time (finished runs are skipped), so the copy grows seed by seed
        seeds+=("$seed")
        # shellcheck disable=SC2086
        $PY experiments/table1.py --data "$data" --dataset "$ds" --fraction "$frac" \
            --methods suponly meanteacher cdcl --seeds "${seeds[@]}" --out "$RUNS/$name" \
            -- "${BUDGET[@]}" $extra
        mkdir -p "$OUT/$name"
        cp "$RUNS/$name/results.md" "$RUNS/$name/runs.csv" "$RUNS/$name/results.json" "$OUT/$name/"
    done
}
STAGES=${STAGES:-"dsb-1_32 monuseg-1_8"}
for s in $STAGES; do
    case $s in
        dsb-1_32) t1 dsb-1_32 dsb "$DSB" 1/32 "" 0 1 2 3 4 ;;
        # H&E: the classical reference takes Otsu's dark side (experiments/otsu_polarity.py)
        monuseg-1_8) t1 monuseg-1_8 monuseg "$MONUSEG" 1/8 "--otsu-side dark" 0 1 2 ;;
        *) echo "unknown stage $s" >&2; exit 2 ;;
    esac
done
