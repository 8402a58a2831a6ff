"""The `torch.library` custom ops behind `masked_infonce`, their fake kernels and autograd.

Two ops, both taking the backend name, so one autograd formula (docs/design.md §3) serves every streaming
backend. They take the raw feature rows: L2 normalisation is part of the op (cdcl_ops.normalize),
so no normalised copy is kept for backward.

    cdcl_ops::masked_infonce_fwd        -> (loss (N,), lse (N,), o (N, D) or (0, D),
                                            inverse row norms of q (N,), p (N,), k (M,))
    cdcl_ops::masked_infonce_bank_grad  -> dK (M, D), called from backward only when the bank
                                           requires grad
"""
import torch
from torch import Tensor

from .backends import registry
from .backends.interface import BankGrad, Forward, InverseNorms, Masks, Options
from .normalize import acc_dtype, inverse_norms, project_


def _forward(backend: str) -> Forward:
    forward = registry.get(backend).forward
    if forward is None:
        streaming = tuple(n for n in registry.names() if registry.get(n).forward is not None)
        raise ValueError(f"backend: expected one of {streaming} for the custom op, got {backend!r}")
    return forward


def _bank_grad(backend: str) -> BankGrad:
    bank_grad = registry.get(backend).bank_grad
    if bank_grad is None:
        streaming = tuple(n for n in registry.names() if registry.get(n).bank_grad is not None)
        raise ValueError(f"backend: expected one of {streaming} for the custom op, got {backend!r}")
    return bank_grad


@torch.library.custom_op("cdcl_ops::masked_infonce_fwd", mutates_args=())
def masked_infonce_fwd(q: Tensor, p: Tensor, k: Tensor, q_lab: Tensor, q_grp: Tensor, k_lab: Tensor,
                       k_grp: Tensor, table: Tensor, inv_tau: float, backend: str, chunk_size: int,
                       precision: str, need_o: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # the schema is flat; the backends take the bundles
    inv_q, inv_p, inv_k = inverse_norms(q), inverse_norms(p), inverse_norms(k)
    loss, lse, o = _forward(backend)(q, p, k, InverseNorms(inv_q, inv_p, inv_k),
                                     Masks(q_lab, q_grp, k_lab, k_grp, table),
                                     Options(inv_tau, chunk_size, precision), need_o)
    return loss, lse, o, inv_q, inv_p, inv_k


@masked_infonce_fwd.register_fake
def _(q, p, k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, backend, chunk_size, precision, need_o):
    n, d = q.shape
    acc = acc_dtype(q)
    return (q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc),
            q.new_empty((n if need_o else 0, d), dtype=acc), q.new_empty(n, dtype=acc),
            q.new_empty(n, dtype=acc), k.new_empty(k.shape[0], dtype=acc))


@torch.library.custom_op("cdcl_ops::masked_infonce_bank_grad", mutates_args=())
def masked_infonce_bank_grad(q: Tensor, k: Tensor, inv_q: Tensor, inv_k: Tensor, q_lab: Tensor,
                             q_grp: Tensor, k_lab: Tensor, k_grp: Tensor, table: Tensor, lse: Tensor,
                             gs: Tensor, inv_tau: float, backend: str, chunk_size: int,
                             precision: str) -> Tensor:
    # Kernels round the weights exp(s - lse) * gs to 16 bits before their second product when the
    # features are 16-bit. Under a mean over N queries gs ~ 1 / (N tau), and exp(s - lse) ~ 1 / M,
    # so fp16 weights underflow (emulated at N = 51,200, M = 25,600: 23% error in dK). Dividing gs
    # by its largest magnitude keeps every weight in [-1, 1]; dK is scaled back afterwards.
    g_scale = (gs.abs().amax() if gs.numel() else gs.new_ones(())).clamp_min(1e-30)
    dk_unit = _bank_grad(backend)(q, k, InverseNorms(inv_q, None, inv_k),
                                  Masks(q_lab, q_grp, k_lab, k_grp, table), lse, gs / g_scale,
                                  Options(inv_tau, chunk_size, precision))
    return project_(k, inv_k, dk_unit.to(inv_k.dtype)).mul_(g_scale).to(k.dtype)


@masked_infonce_bank_grad.register_fake
def _(q, k, inv_q, inv_k, q_lab, q_grp, k_lab, k_grp, table, lse, gs, inv_tau, backend, chunk_size,
      precision):
    # a new contiguous (M, D), as every backend returns it: empty_like would keep the strides of a
    # non-contiguous bank, and Inductor lays out what follows by the fake's strides
    return k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, p, k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, backend, chunk_size, precision, _ = inputs
    loss, lse, o, *inv = output
    # the inputs themselves cost nothing to keep; a detached bank and an unused O are not kept
    need_q, need_p, need_k = ctx.needs_input_grad[:3]
    ctx.save_for_backward(q, p, k if need_k else None, loss, lse, o if need_q else None, *inv,
                          *Masks(q_lab, q_grp, k_lab, k_grp, table))
    ctx.backend = backend
    ctx.options = Options(inv_tau, chunk_size, precision)
    ctx.mark_non_differentiable(lse, o, *inv)
    # no zero gradients for the non-differentiable outputs: for O that would be an N x D buffer
    ctx.set_materialize_grads(False)


def _input_grads(ctx, dq=None, dp=None, dk=None):
    """One gradient per input of the op: the features' three, None for the rest."""
    return (dq, dp, dk) + (None,) * (len(ctx.needs_input_grad) - 3)


_N_NORMS = len(InverseNorms._fields)


def _backward(ctx, g_loss, g_lse, g_o, *g_inv):
    q, p, k, loss, lse, o, *rest = ctx.saved_tensors
    inv, masks = InverseNorms(*rest[:_N_NORMS]), Masks(*rest[_N_NORMS:])
    options = ctx.options
    if g_loss is None:  # only reached through the non-differentiable outputs: nothing flows
        return _input_grads(ctx)
    acc = loss.dtype
    gs = g_loss.to(acc) * options.inv_tau
    # pi+ = exp(s+ - LSE) = exp(-loss): exactly 1 for rows without negatives, so they get 0
    coef = (torch.exp(-loss) - 1.0) * gs
    dq = dp = dk = None
    if ctx.needs_input_grad[0]:
        if o.shape[0] != p.shape[0]:
            raise RuntimeError("masked_infonce_fwd was called with need_o=False, so the query "
                               "gradient is unavailable; call it with need_o=True")
        # with respect to the unit query: gs * O + coef * p / |p|
        g_unit = (o * gs[:, None]).addcmul_(p, (coef * inv.p)[:, None])
        dq = project_(q, inv.q, g_unit).to(q.dtype)
    if ctx.needs_input_grad[1]:
        g_unit = q.to(acc) * (coef * inv.q)[:, None]
        dp = project_(p, inv.p, g_unit).to(p.dtype)
    if ctx.needs_input_grad[2]:
        dk = masked_infonce_bank_grad(q, k, inv.q, inv.k, *masks, lse, gs, options.inv_tau,
                                      ctx.backend, options.chunk_size, options.precision)
    return _input_grads(ctx, dq, dp, dk)


masked_infonce_fwd.register_autograd(_backward, setup_context=_setup_context)
