#!/usr/bin/env bash
# One prepared check for a lent GPU machine (bare, no network), in under 8 minutes:
# build, GPU tests (Triton/CUDA/FlexAttention against the reference), the benchmark at `paper` and
# `large` (reference, the Triton precisions, FlexAttention, compile(reference), the CUDA backend on
# CUDA cores and tensor cores), and (RUN_SWEEP=1) a Triton launch-config sweep. Files go into $OUT
# if set. Every stage's timeout is cut to what is left of BUDGET seconds (default 470), and the last
# thing printed is the summary: the GPU tests' counts and one table of every benchmark row measured.
#   bash benchmarks/gpu_check.sh            # build, tests, benchmark (paper, large)
#   RUN_SWEEP=1 BUDGET=590 bash benchmarks/gpu_check.sh    # also the Triton launch-config sweep
#   CONTENDERS=reference,triton-bf16,flex-bf16 BENCH_SIZES=large bash benchmarks/gpu_check.sh
#   SUPCON_SIZES= bash benchmarks/gpu_check.sh    # without the supervised contrastive rows
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }
BUDGET=${BUDGET:-470}
# cap WANT RESERVE: WANT seconds, or what is left of the budget once RESERVE seconds are kept for
# the stages after this one (at least 10)
cap() {
    local left=$(( BUDGET - ($(date +%s) - start) - $2 ))
    local t=$(( $1 < left ? $1 : left ))
    echo $(( t < 10 ? 10 : t ))
}

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

stamp "build"
# setup.py directly: pip would try to fetch build dependencies, and there is no network here
if ! MAX_JOBS=${MAX_JOBS:-16} timeout "$(cap "${BUILD_TIMEOUT:-240}" 200)" "$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
    echo "build failed (see build.log)"; tail -5 "$OUT/build.log"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

stamp "GPU tests"
"$PY" -c "import cdcl_ops; print('backends on cuda:', cdcl_ops.available_backends('cuda'))"
# -v: one line per test as it finishes, so a stage that runs out of time still says what passed;
# a per-test limit where pytest-timeout is installed
per_test=()
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)
timeout "$(cap "${TEST_TIMEOUT:-180}" 120)" "$PY" -m pytest -v -m gpu tests -p no:cacheprovider ${per_test[@]+"${per_test[@]}"} 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" | tail -25

stamp "benchmark"
# Contenders in order of what the GPU goals need (RESULTS.md), so that a size cut short by its
# timeout keeps those rows (each row is written as measured): reference, then triton bf16 against
# flex bf16, the other Triton precisions, the compiled ones, and the CUDA backend last (its
# tensor-core kernels have never run on a GPU; a kernel fault would spoil the CUDA context for
# whatever runs after it). flex with fp32 features is IEEE fp32 in FlexAttention's kernels (slow;
# paper only); flex-tf32 is on request (CONTENDERS=...).
default_contenders() {
    local fp32_flex=""
    [ "$1" = paper ] && fp32_flex=",flex"
    echo "reference,triton-bf16,flex-bf16,triton,triton-tf32,compile(reference)$fp32_flex,cuda,cuda-bf16,cuda-bf16-tc"
}
# one invocation per size, so that a size that finishes is kept even if a later one runs out of time;
# the supervised contrastive stage after them keeps 60 s unless SUPCON_SIZES is empty
supcon_reserve=60
[ -z "${SUPCON_SIZES-contrastiveseg}" ] && supcon_reserve=0
read -r -a sizes <<< "${BENCH_SIZES:-paper large}"
for i in "${!sizes[@]}"; do
    size=${sizes[$i]}
    later=$(( ${#sizes[@]} - i - 1 ))  # sizes still to come get a share of what is left
    # --allow-missing: a failed build leaves no cuda contenders; their rows say so, the rest run
    timeout "$(cap "${BENCH_TIMEOUT:-150}" $(( 15 + supcon_reserve + later * 110 )))" "$PY" -m benchmarks.run --sizes "$size" --device cuda \
        --out "$OUT" --time-limit 3 --allow-missing --contenders "${CONTENDERS:-$(default_contenders "$size")}" \
        2>&1 | tee "$OUT/bench-$size.log" | grep -v "^benchmark:" | tail -4
done

stamp "benchmark: supervised contrastive loss"
# supervised_contrast (issue 23) at ContrastiveSeg's size, the queue detached as there: the
# materialising reference first (the goal: triton bf16 at least 10x faster), then the Triton
# precisions, SupConLoss and compile(reference)
default_supcon_contenders() {
    echo "reference,triton-bf16,triton,triton-tf32,supconloss,compile(reference)"
}
read -r -a supcon_sizes <<< "${SUPCON_SIZES-contrastiveseg}"
for size in ${supcon_sizes[@]+"${supcon_sizes[@]}"}; do
    timeout "$(cap "${SUPCON_TIMEOUT:-90}" 15)" "$PY" -m benchmarks.run --loss supcon-all --sizes "$size" \
        --device cuda --out "$OUT" --time-limit 3 --bank-grad no --allow-missing \
        --contenders "${SUPCON_CONTENDERS:-$(default_supcon_contenders)}" \
        2>&1 | tee "$OUT/bench-supcon-$size.log" | grep -v "^benchmark:" | tail -4
done

if [ -n "${RUN_SWEEP:-}" ]; then
    stamp "Triton launch-config sweep"
    timeout "$(cap "${SWEEP_TIMEOUT:-120}" 10)" "$PY" -m benchmarks.triton_configs --sizes paper,large --dtypes bfloat16,tf32 \
        --kernels "${SWEEP_KERNELS:-fwd,bank_grad}" 2>&1 \
        | tee "$OUT/triton_configs.log"
fi

stamp "summary"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/gpu_tests.log" | tail -15
"$PY" -m benchmarks.summary "$OUT"
stamp "done"
