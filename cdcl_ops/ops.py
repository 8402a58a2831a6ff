"""The `torch.library` custom ops behind `masked_infonce`, their fake kernels and autograd.

Two ops, both taking the backend name, so one autograd formula (SPEC 2.2) serves every streaming
backend:

    cdcl_ops::masked_infonce_fwd        -> (loss (N,), lse (N,), o (N, D) or (0, D))
    cdcl_ops::masked_infonce_bank_grad  -> dK (M, D), called from backward only when the bank
                                           requires grad
"""
import importlib

import torch
from torch import Tensor

_IMPLS = {
    "chunked": ("cdcl_ops.backends.chunked", "cdcl_ops.backends.chunked"),
    "triton": ("cdcl_ops.backends.triton_forward", "cdcl_ops.backends.triton_backward"),
    "cpu": ("cdcl_ops.backends.native", "cdcl_ops.backends.native"),
    "cuda": ("cdcl_ops.backends.native", "cdcl_ops.backends.native"),
}


def _impl(backend: str, which: int):
    if backend not in _IMPLS:
        raise ValueError(f"backend: expected one of {sorted(_IMPLS)} for the custom op, got {backend!r}")
    module = importlib.import_module(_IMPLS[backend][which])
    return module.forward if which == 0 else module.bank_grad


def _acc_dtype(t: Tensor):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("cdcl_ops::masked_infonce_fwd", mutates_args=())
def masked_infonce_fwd(q: Tensor, p: Tensor, k: Tensor, q_lab: Tensor, q_grp: Tensor, k_lab: Tensor,
                       k_grp: Tensor, table: Tensor, inv_tau: float, backend: str, chunk_size: int,
                       precision: str, need_o: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend, 0)(q, p, k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, need_o,
                             chunk_size, precision)


@masked_infonce_fwd.register_fake
def _(q, p, k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, backend, chunk_size, precision, need_o):
    n, d = q.shape
    acc = _acc_dtype(q)
    return (q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc),
            q.new_empty((n if need_o else 0, d), dtype=acc))


@torch.library.custom_op("cdcl_ops::masked_infonce_bank_grad", mutates_args=())
def masked_infonce_bank_grad(q: Tensor, k: Tensor, q_lab: Tensor, q_grp: Tensor, k_lab: Tensor,
                             k_grp: Tensor, table: Tensor, lse: Tensor, gs: Tensor, inv_tau: float,
                             backend: str, chunk_size: int, precision: str) -> Tensor:
    return _impl(backend, 1)(q, k, q_lab, q_grp, k_lab, k_grp, table, lse, gs, inv_tau,
                             chunk_size, precision)


@masked_infonce_bank_grad.register_fake
def _(q, k, q_lab, q_grp, k_lab, k_grp, table, lse, gs, inv_tau, backend, chunk_size, precision):
    return torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    q, p, k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, backend, chunk_size, precision, _ = inputs
    loss, lse, o = output
    # keep only what the gradients that will be asked for need (a detached bank is not kept)
    need_q, need_p, need_k = ctx.needs_input_grad[:3]
    ctx.save_for_backward(q if (need_p or need_k) else None, p if need_q else None,
                          k if need_k else None, q_lab, q_grp, k_lab, k_grp, table, loss, lse,
                          o if need_q else None)
    ctx.options = (inv_tau, backend, chunk_size, precision)
    ctx.mark_non_differentiable(lse, o)


def _backward(ctx, g_loss, g_lse, g_o):
    q, p, k, q_lab, q_grp, k_lab, k_grp, table, loss, lse, o = ctx.saved_tensors
    inv_tau, backend, chunk_size, precision = ctx.options
    acc = loss.dtype
    gs = g_loss.to(acc) * inv_tau
    # pi+ = exp(s+ - LSE) = exp(-loss): exactly 1 for rows without negatives, so they get 0
    coef = (torch.exp(-loss) - 1.0) * gs
    dq = dp = dk = None
    if ctx.needs_input_grad[0]:
        if o.shape[0] != p.shape[0]:
            raise RuntimeError("masked_infonce_fwd was called with need_o=False, so the query "
                               "gradient is unavailable; call it with need_o=True")
        dq = torch.addcmul(o * gs[:, None], p, coef[:, None]).to(p.dtype)
    if ctx.needs_input_grad[1]:
        dp = (q * coef[:, None]).to(q.dtype)
    if ctx.needs_input_grad[2]:
        dk = masked_infonce_bank_grad(q, k, q_lab, q_grp, k_lab, k_grp, table, lse, gs, inv_tau,
                                      backend, chunk_size, precision)
    return (dq, dp, dk) + (None,) * 10


masked_infonce_fwd.register_autograd(_backward, setup_context=_setup_context)
