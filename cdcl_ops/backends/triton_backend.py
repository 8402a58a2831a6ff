"""The `triton` backend's record: where it runs and its entry points.

The kernels' modules (triton_forward, triton_backward, triton_contrast, triton_patches) import
triton, so they are loaded on first use only: cdcl_ops imports, and lists this backend as
unavailable, without Triton.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .interface import LOSSES, Contrast, ContrastRows, InverseNorms, Masks, Options
from .platform import FUSED_DTYPES, MAX_D, TRITON_INSTALLED, triton_interpreting
from .registry import Backend


def _available(device: torch.device) -> tuple[bool, str]:
    if not TRITON_INSTALLED:
        return False, "triton is not installed"
    if device.type != "cuda" and not triton_interpreting():
        return False, "triton needs CUDA tensors, or TRITON_INTERPRET=1 set before importing cdcl_ops"
    return True, ""


def forward(q: Tensor, p: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, options: Options,
            need_o: bool) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton_forward
    return triton_forward.forward(q, p, k, inv, masks, options, need_o)


def bank_grad(q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor, gs: Tensor,
              options: Options) -> Tensor:
    from . import triton_backward
    return triton_backward.bank_grad(q, k, inv, masks, lse, gs, options)


def contrast_forward(q: Tensor, p: Tensor | None, k: Tensor, inv: InverseNorms, masks: Masks,
                     options: Options, contrast: Contrast, need_u: bool) -> ContrastRows:
    from . import triton_contrast
    return triton_contrast.forward(q, p, k, inv, masks, options, contrast, need_u)


def contrast_bank_grad(q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor,
                       gs_lse: Tensor, gs_pos: Tensor, options: Options, contrast: Contrast) -> Tensor:
    from . import triton_contrast
    return triton_contrast.bank_grad(q, k, inv, masks, lse, gs_lse, gs_pos, options, contrast)


def patch_counts(x: Tensor, grid: int, fg_class: int) -> Tensor:
    from . import triton_patches
    return triton_patches.patch_fg_counts(x, grid, fg_class)


# the default on CUDA for the loss and the patch counts: the fastest measured there
# (benchmarks/RESULTS.md)
RECORDS = (Backend("triton", _available, dtypes=FUSED_DTYPES, max_d=MAX_D, forward=forward,
                   bank_grad=bank_grad, patch_counts=patch_counts, default_on=("cuda",),
                   patch_default_on=("cuda",), priority=2, options=("precision",), losses=LOSSES,
                   contrast_forward=contrast_forward, contrast_bank_grad=contrast_bank_grad),)
