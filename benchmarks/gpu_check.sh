#!/usr/bin/env bash
# One prepared check for a lent GPU machine (bare, no network), in under 8 minutes:
# build, GPU tests (Triton/CUDA against the reference), the benchmark at `paper` and `large`,
# and (RUN_SWEEP=1) a Triton launch-config sweep. Files go into $OUT if set. Every stage's timeout
# is cut to what is left of BUDGET seconds (default 470), and the last thing printed is the
# summary: the GPU tests' counts and one table of every benchmark row measured.
#   bash benchmarks/gpu_check.sh            # build, tests, benchmark (paper, large)
#   RUN_SWEEP=1 BUDGET=590 bash benchmarks/gpu_check.sh    # also the Triton launch-config sweep
set -uo pipefail
cd "$(dirname "$0")/.."
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
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

stamp "build"
# setup.py directly: pip would try to fetch build dependencies, and there is no network here
if ! MAX_JOBS=${MAX_JOBS:-16} timeout $(cap ${BUILD_TIMEOUT:-240} 200) $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
    echo "build failed (see build.log)"; tail -5 "$OUT/build.log"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

stamp "GPU tests"
$PY -c "import cdcl_ops; print('backends on cuda:', cdcl_ops.available_backends('cuda'))"
# -v: one line per test as it finishes, so a stage that runs out of time still says what passed;
# a per-test limit where pytest-timeout is installed
per_test=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 60")
timeout $(cap ${TEST_TIMEOUT:-180} 120) $PY -m pytest -v -m gpu tests -p no:cacheprovider $per_test 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" | tail -25

stamp "benchmark"
# one invocation per size, so that a size that finishes is kept even if a later one runs out of time
sizes=(${BENCH_SIZES:-paper large})
for i in "${!sizes[@]}"; do
    size=${sizes[$i]}
    later=$(( ${#sizes[@]} - i - 1 ))  # sizes still to come get a share of what is left
    timeout $(cap ${BENCH_TIMEOUT:-150} $(( 15 + later * 75 ))) $PY -m benchmarks.run --sizes "$size" --device cuda --out "$OUT" --time-limit 3 \
        --contenders "${CONTENDERS:-reference,released-ckpt,chunked-ckpt,compile(reference),chunked,triton,triton-tf32,triton-bf16,cuda,cuda-bf16,cuda-bf16-tc}" \
        2>&1 | tee "$OUT/bench-$size.log" | grep -v "^benchmark:" | tail -4
done

if [ -n "${RUN_SWEEP:-}" ]; then
    stamp "Triton launch-config sweep"
    timeout $(cap ${SWEEP_TIMEOUT:-120} 10) $PY -m benchmarks.triton_configs --sizes paper,large --dtypes bfloat16,tf32 \
        --kernels "${SWEEP_KERNELS:-fwd,bank_grad}" 2>&1 \
        | tee "$OUT/triton_configs.log"
fi

stamp "summary"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/gpu_tests.log" | tail -15
$PY -m benchmarks.summary "$OUT"
stamp "done"
