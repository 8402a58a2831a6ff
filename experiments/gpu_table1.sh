#!/usr/bin/env bash
# The second prepared command for a lent GPU machine (one H200, bare, no network), under 10
# minutes: the paper preset (DenseNet-161 DenseUNet, random init, bf16 autocast, channels_last) on
# DSB2018 at 1/32 labeled, SupOnly then CDCL, one seed, a shortened schedule (EPOCHS x ITERS steps
# of batch 8+8 on 256-pixel native-resolution crops; defaults 4 x 75 = 300 steps, validation and
# best.pt only at the end); prints both test reports (model and Otsu) last.
#
# The data travels with the checkout in a folder git ignores (../shared does not travel). Copy it
# once before the lease (about 54 MiB, which fits the 64 MiB transfer beside the tracked files):
#   mkdir -p data/local && cp -r ../shared/nuclei/dsb2018/stage1_train data/local/dsb2018
# then run with data/local/dsb2018 carried (the device tool's `carry`), within a 600 s timeout:
#   bash experiments/gpu_table1.sh --dry-run     # the plan and the transfer size; no GPU needed
#   bash experiments/gpu_table1.sh               # the run (BUDGET seconds in all, default 540)
#   EPOCHS=1 ITERS=2 MAX_IMAGES=40 PRESET=tiny DEVICE=cpu DATA=data/dsb2018_sample bash experiments/gpu_table1.sh
# Into $OUT (else runs/gpu_table1/out), at most 8 files: summary.txt, suponly.log, cdcl.log and
# results.tar.gz (each run's metrics, config, splits and log.csv; no checkpoints, which stay in WORK).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) echo "gpu_table1: unknown argument $arg (expected --dry-run or nothing)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
DATA=${DATA:-data/local/dsb2018}
OUT=${OUT:-runs/gpu_table1/out}
WORK=${WORK:-runs/gpu_table1/work}
BUDGET=${BUDGET:-540}
RUN_TIMEOUT=${RUN_TIMEOUT:-250}
DEVICE=${DEVICE:-cuda}
LIMIT_MIB=64  # what the device tool carries: the tracked files and the carried folders together
if [ ! -d "$DATA/images" ] || [ ! -d "$DATA/labels" ]; then
    echo "gpu_table1: DATA: expected a DSB2018 folder with images/ and labels/ (copy it: mkdir -p data/local && cp -r ../shared/nuclei/dsb2018/stage1_train data/local/dsb2018), got $DATA" >&2
    exit 2
fi
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
data_bytes=$(du -sb "$DATA" | cut -f1)
if git rev-parse --git-dir >/dev/null 2>&1; then
    tracked_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
else
    tracked_bytes=0  # the device machine's copy has no git
fi
total=$(( data_bytes + tracked_bytes ))
echo "gpu_table1: data $DATA $(mib "$data_bytes") MiB + tracked files $(mib "$tracked_bytes") MiB = $(mib "$total") MiB of the $LIMIT_MIB MiB transfer"
if [ "$total" -gt $(( LIMIT_MIB * 1048576 )) ]; then
    echo "gpu_table1: DATA: $(mib "$total") MiB with the tracked files, over the $LIMIT_MIB MiB a lease carries" >&2
    exit 2
fi
if [ "$DEVICE" = cuda ]; then
    CAST=(--autocast bf16 --channels-last)
else
    CAST=()
fi
COMMON=(--data "$DATA" --dataset dsb --preset "${PRESET:-paper}" --labeled-fraction 1/32 --seed 0
        --input-size "${CROP:-256}" --epochs "${EPOCHS:-4}" --iters-per-epoch "${ITERS:-75}"
        --unsup-start-epoch "${UNSUP_START:-2}" --val-every "${EPOCHS:-4}" --lr 1e-3 --ema-alpha 0.99
        --device "$DEVICE" --no-progress --overlays 4 "${CAST[@]}")
[ -n "${MAX_IMAGES:-}" ] && COMMON+=(--max-images "$MAX_IMAGES")
if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_table1: dry run, budget $BUDGET s, each run at most $RUN_TIMEOUT s (and half of what is left), results in $OUT"
    for m in suponly cdcl; do
        echo "  $PY train.py ${COMMON[*]} --method $m --out $WORK/$m"
    done
    exit 0
fi
export PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
rm -rf "$WORK/suponly" "$WORK/cdcl"  # an earlier run's (a warm machine keeps WORK)
start=$(date +%s)
stamp() { echo "[gpu_table1 +$(( $(date +%s) - start ))s] $*"; }
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
status=()
for i in 0 1; do
    m=$([ "$i" = 0 ] && echo suponly || echo cdcl)
    left=$(( BUDGET - ($(date +%s) - start) - 20 ))  # 20 s for the summary and the archive
    share=$(( left / (2 - i) ))
    t=$(( share < RUN_TIMEOUT ? share : RUN_TIMEOUT ))
    if [ "$t" -lt 30 ]; then
        status+=("$m: skipped, $left s left"); stamp "$m skipped ($left s left)"; continue
    fi
    stamp "$m (at most $t s)"
    # the training loss backend is the default (triton on CUDA): no build of the extension needed
    timeout "$t" "$PY" train.py "${COMMON[@]}" --method "$m" --out "$WORK/$m" >"$OUT/$m.log" 2>&1
    rc=$?
    status+=("$m: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)') after $(( $(date +%s) - start )) s")
    grep -v "^epoch" "$OUT/$m.log" | tail -4
done
(cd "$WORK" && find . \( -name 'metrics.*' -o -name 'config.json' -o -name 'splits.json' -o -name 'log.csv' \) -print0 \
    | tar -czf "$OUT/results.tar.gz" --null -T -) || echo "gpu_table1: results.tar.gz not written"
{
    echo "gpu_table1 summary: ${EPOCHS:-4} x ${ITERS:-75} steps per method, $(( $(date +%s) - start )) s"
    printf '%s\n' "${status[@]}"
    echo "test split, native resolution:"
    for m in suponly cdcl; do
        echo "== $m"; grep -E "^(model|Otsu):" "$OUT/$m.log" 2>/dev/null | tail -2
    done
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
