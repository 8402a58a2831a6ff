#!/usr/bin/env bash
# A prepared check for a lent GPU machine (one H200, bare, no network), under 8 minutes: the paper
# preset (DenseNet-161 DenseUNet, random init, bf16 autocast, channels_last) on DSB2018 at 1/32
# labeled, SupOnly then CDCL, one seed, a shortened schedule (EPOCHS x ITERS steps of batch 8+8 on
# 256-pixel native-resolution crops; defaults 12 x 25 = 300 steps); prints both test reports (model
# and Otsu) last. Files go to $OUT (default runs/gpu_table1).
#   DATA=/path/to/stage1_train bash experiments/gpu_table1.sh
#   EPOCHS=1 ITERS=2 MAX_IMAGES=40 PRESET=tiny DEVICE=cpu bash experiments/gpu_table1.sh   # CPU smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_table1}
PY=${PYTHON:-python3}
DATA=${DATA:-}
for d in "$DATA" ../shared/nuclei/dsb2018/stage1_train shared/nuclei/dsb2018/stage1_train; do
    if [ -n "$d" ] && [ -d "$d" ]; then DATA=$d; break; fi
done
if [ ! -d "$DATA" ]; then echo "gpu_table1: no DSB2018 stage1_train folder found (set DATA)"; exit 2; fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "[gpu_table1 +$(( $(date +%s) - start ))s] $*"; }
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    CAST=(--autocast bf16 --channels-last)
else
    CAST=()
fi
if ! $PY -c "import cdcl_ops._C" 2>/dev/null; then
    stamp "build"
    MAX_JOBS=${MAX_JOBS:-16} $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || tail -5 "$OUT/build.log"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
COMMON=(--data "$DATA" --dataset dsb --preset "${PRESET:-paper}" --labeled-fraction 1/32 --seed 0
        --input-size "${CROP:-256}" --epochs "${EPOCHS:-12}" --iters-per-epoch "${ITERS:-25}"
        --unsup-start-epoch "${UNSUP_START:-3}" --lr 1e-3 --ema-alpha 0.99 --device "$DEVICE"
        --no-progress --overlays 4 "${CAST[@]}")
[ -n "${MAX_IMAGES:-}" ] && COMMON+=(--max-images "$MAX_IMAGES")
for m in suponly cdcl; do
    stamp "$m"
    timeout "${RUN_TIMEOUT:-210}" $PY train.py "${COMMON[@]}" --method "$m" --out "$OUT/$m" 2>&1 | tee "$OUT/$m.log" | grep -v "^epoch" || true
done
stamp "summary (test split, native resolution)"
for m in suponly cdcl; do
    echo "== $m"; tail -2 "$OUT/$m.log"
done
