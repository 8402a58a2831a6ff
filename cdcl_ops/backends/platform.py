"""What this process and the kernels can do, decided without importing any backend: whether Triton
is installed and interpreting, the fused kernels' dtypes and maximum feature dim.

A leaf module (it imports nothing of cdcl_ops), so the registry, the backends' records and the
Triton launch code can all read it without importing one another.
"""
from __future__ import annotations

import importlib.util
import os

import torch

# The largest feature dim of the fused kernels: Triton keeps a BLOCK_D-wide tile of a query's
# output in registers, and the CUDA kernels 16 values per lane (csrc/cuda/launch.h MAX_D is the
# kernels' own copy; tests/ops/test_backend_registry.py checks the two agree).
MAX_D = 512
FUSED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
ALL_DTYPES: tuple[torch.dtype, ...] = FUSED_DTYPES + (torch.float64,)

# decided once at import: torch.compile cannot trace importlib
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton runs its kernels on the CPU (TRITON_INTERPRET=1, the tests' mode)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
