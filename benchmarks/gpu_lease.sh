#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (bare, no network, a few minutes): environment,
# the extension built for the GPU at hand beside the Triton tests, the CUDA-core, tensor-core and
# compile tests, the benchmark (bank detached at paper and large, bank gradient at paper) and a
# paper-preset training smoke run, in that order, under one internal deadline (480 s unless
# --budget or LEASE_BUDGET says otherwise). At most 8 files go into $OUT (else runs/lease/out):
# summary.txt, printed last, and archives of the logs and of the build and caches for a rerun.
# benchmarks/lease.py holds the plan; docs/native.md ("A lent GPU") says how to run and rerun it.
#   bash benchmarks/gpu_lease.sh --dry-run      # the plan, its deadlines and skips, no GPU needed
#   bash benchmarks/gpu_lease.sh                # the lease
#   LEASE_REUSE=.lease bash benchmarks/gpu_lease.sh --only compile,bench-grad --budget 240
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python3}" -m benchmarks.lease "$@"
