"""The `cpu` and `cuda` backends: the C++/CUDA kernels of csrc/, compiled into `cdcl_ops._C`.

The extension registers the ops `torch.ops.cdcl_ops_C.{infonce_fwd, infonce_bank_grad,
supcon_fwd, supcon_bank_grad, patch_fg_counts, cpu_products}` (schemas in csrc/ops.cpp, CPU
kernels in csrc/cpu, CUDA kernels in csrc/cuda; the supervised contrastive loss has CPU kernels
only, so the `cuda` record does not take it).
This module loads it when it was built, registers the ops' fake kernels (for torch.compile and
opcheck), implements the entry points of `backends.interface` on top of them, and declares the
`cpu` and `cuda` records.
`import cdcl_ops` works without the extension; `LOADED`/`LOAD_ERROR` say what happened.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..normalize import acc_dtype
from .interface import LOSSES, Contrast, ContrastRows, InverseNorms, Masks, Options
from .platform import FUSED_DTYPES, MAX_D
from .registry import Backend

LOAD_ERROR: str | None = None
try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # not built, or built against another torch
    LOADED, LOAD_ERROR = False, f"{type(exc).__name__}: {exc}"
else:
    LOADED = True

# decided once at import: torch.compile cannot trace the dispatcher queries
HAS_CPU = LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("cdcl_ops_C::infonce_fwd", "CPU")
HAS_CUDA = LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("cdcl_ops_C::infonce_fwd",
                                                                     "CUDA")


# The fake kernels (for torch.compile and opcheck), named so that the tests can hold the CUDA
# emulator's outputs to them too (tests/native/test_cuda_emulated.py)
def fwd_fake(q, p, k, inv_q, inv_p, inv_k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, need_o,
             tensor_cores):
    n, d = q.shape
    acc = acc_dtype(q)
    return (q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc),
            q.new_empty((n if need_o else 0, d), dtype=acc))


def bank_grad_fake(q, k, inv_q, inv_k, q_lab, q_grp, k_lab, k_grp, table, lse, gs, inv_tau,
                   tensor_cores):
    return k.new_empty(k.shape, dtype=acc_dtype(k))


def supcon_fwd_fake(q, p, k, inv_q, inv_p, inv_k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, denominator,
                    exclude_self, need_u):
    n, d = q.shape
    acc = acc_dtype(q)
    vectors = [q.new_empty(n, dtype=acc) for _ in range(4)]
    return (vectors[0], vectors[1], q.new_empty(n, dtype=torch.int32), vectors[2], vectors[3],
            q.new_empty((n if need_u else 0, d), dtype=acc))


def supcon_bank_grad_fake(q, k, inv_q, inv_k, q_lab, q_grp, k_lab, k_grp, table, lse, gs_lse, gs_pos, inv_tau,
                          denominator, exclude_self):
    return k.new_empty(k.shape, dtype=acc_dtype(k))


def patch_counts_fake(labels_or_logits, grid, fg_class):
    return labels_or_logits.new_empty((labels_or_logits.shape[0], grid, grid), dtype=torch.int32)


if LOADED:
    torch.library.register_fake("cdcl_ops_C::infonce_fwd")(fwd_fake)
    torch.library.register_fake("cdcl_ops_C::infonce_bank_grad")(bank_grad_fake)
    torch.library.register_fake("cdcl_ops_C::supcon_fwd")(supcon_fwd_fake)
    torch.library.register_fake("cdcl_ops_C::supcon_bank_grad")(supcon_bank_grad_fake)
    torch.library.register_fake("cdcl_ops_C::patch_fg_counts")(patch_counts_fake)


def _require():
    if not LOADED:
        raise RuntimeError(f"cdcl_ops._C is not available ({LOAD_ERROR}); build it with "
                           "`pip install --no-build-isolation -e .`")


def cpu_products(dtype: torch.dtype) -> str:
    """How the cpu backend multiplies rows of `dtype` here: "avx512" (fp32 rows, our AVX-512
    register blocks), "avx512-bf16" (bf16 rows, AVX512-BF16 instructions) or "blas" (fp64 and fp16
    rows, a CPU without the instructions, or CDCL_OPS_CPU_PRODUCTS=blas; read at each call)."""
    _require()
    return torch.ops.cdcl_ops_C.cpu_products(dtype)


def tensor_cores(q: Tensor, precision: str) -> bool:
    """Whether the CUDA kernels take their tensor-core path (16-bit features, D <= 256).

    Only on request (precision="tf32") for now: that path passes the compile-only check and the
    CPU emulator's tests (tests/native/cuda_emu) but has not yet run on a GPU, so "auto" stays on
    the CUDA-core kernels until a GPU run has compared both. fp32 features always use the CUDA-core
    kernels. `q.is_cuda` aside, the rule is `wants_tensor_cores`, which the emulator shares.
    """
    return q.is_cuda and wants_tensor_cores(q.dtype, precision)


def wants_tensor_cores(dtype: torch.dtype, precision: str) -> bool:
    return dtype in (torch.bfloat16, torch.float16) and precision == "tf32"


def forward(q: Tensor, p: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, options: Options,
            need_o: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The Forward entry point of backends.interface."""
    _require()
    return torch.ops.cdcl_ops_C.infonce_fwd(q, p, k, *inv, *masks, float(options.inv_tau),
                                            bool(need_o), tensor_cores(q, options.precision))


def bank_grad(q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor, gs: Tensor,
              options: Options) -> Tensor:
    _require()
    acc = acc_dtype(q)
    return torch.ops.cdcl_ops_C.infonce_bank_grad(q, k, inv.q, inv.k, *masks, lse.to(acc).contiguous(),
                                                  gs.to(acc).contiguous(), float(options.inv_tau),
                                                  tensor_cores(q, options.precision))


def contrast_forward(q: Tensor, p: Tensor | None, k: Tensor, inv: InverseNorms, masks: Masks,
                     options: Options, contrast: Contrast, need_u: bool) -> ContrastRows:
    """The ContrastForward entry point of backends.interface (CPU kernels only)."""
    _require()
    return ContrastRows(*torch.ops.cdcl_ops_C.supcon_fwd(
        q, p, k, inv.q, inv.p, inv.k, *masks, float(options.inv_tau), contrast.denominator,
        bool(contrast.exclude_self), bool(need_u)))


def contrast_bank_grad(q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor,
                       gs_lse: Tensor, gs_pos: Tensor, options: Options, contrast: Contrast) -> Tensor:
    _require()
    acc = acc_dtype(q)
    return torch.ops.cdcl_ops_C.supcon_bank_grad(
        q, k, inv.q, inv.k, *masks, lse.to(acc).contiguous(), gs_lse.to(acc).contiguous(),
        gs_pos.to(acc).contiguous(), float(options.inv_tau), contrast.denominator,
        bool(contrast.exclude_self))


def patch_counts(x: Tensor, grid: int, fg_class: int) -> Tensor:
    return torch.ops.cdcl_ops_C.patch_fg_counts(x, grid, fg_class).to(torch.int32)


def _available(device: torch.device) -> tuple[bool, str]:
    # a CPU-only build registers the ops without CUDA kernels: ask per device type
    if not LOADED:
        return False, f"needs the compiled extension cdcl_ops._C, not loaded here: {LOAD_ERROR}"
    if not {"cpu": HAS_CPU, "cuda": HAS_CUDA}.get(device.type, False):
        return False, f"cdcl_ops._C was built without {device.type} kernels"
    return True, ""


RECORDS = (
    # the loss default on the CPU: the fastest measured there (benchmarks/RESULTS.md)
    Backend("cpu", _available, device_types=("cpu",), forward=forward, bank_grad=bank_grad,
            patch_counts=patch_counts, default_on=("cpu",), patch_default_on=("cpu",), priority=1,
            losses=LOSSES, contrast_forward=contrast_forward, contrast_bank_grad=contrast_bank_grad),
    # not the loss default on CUDA: triton measured faster, and chunked is the fallback there;
    # no kernels of the supervised contrastive loss (the default for it on CUDA is triton)
    Backend("cuda", _available, device_types=("cuda",), dtypes=FUSED_DTYPES, max_d=MAX_D,
            forward=forward, bank_grad=bank_grad, patch_counts=patch_counts,
            patch_default_on=("cuda",), priority=1, options=("precision",)),
)
