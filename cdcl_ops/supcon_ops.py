"""The `torch.library` custom ops behind `supervised_contrast`, their fake kernels and autograd.

Two ops, as for masked_infonce (cdcl_ops.ops), taking the backend name, so one autograd formula
(docs/design.md §7) serves every streaming backend that takes the loss; each supplies the
`contrast_forward` and `contrast_bank_grad` entry points of backends.interface. The optional
paired positive `p` and bank `k` are `Tensor?`: k None means the queries are their own bank (their
row i left out of query i's sets), and its gradient then adds to the queries'.

    cdcl_ops::supcon_fwd        -> (loss, lse, n_pos, lse_weight, pos_coef (N,), u (N, D) or (0, D),
                                    inverse row norms of q (N,), p (N,) or (0,), k (M,) or (0,))
    cdcl_ops::supcon_bank_grad  -> dK (M, D) (dQ's bank part when k is None), called from backward
                                   only when the bank requires grad
"""
import torch
from torch import Tensor

from .backends import interface, registry
from .backends.interface import SUPERVISED_CONTRAST, Contrast, InverseNorms, Masks, Options
from .normalize import acc_dtype, inverse_norms, project_


def _spec(backend: str) -> registry.Backend:
    spec = registry.get(backend)
    spec.check_loss(SUPERVISED_CONTRAST)
    if spec.contrast_forward is None:
        streaming = tuple(n for n in registry.names() if registry.get(n).contrast_forward is not None)
        raise ValueError(f"backend: expected one of {streaming} for the custom op, got {backend!r}")
    return spec


def _forward(backend: str) -> interface.ContrastForward:
    forward = _spec(backend).contrast_forward
    assert forward is not None  # _spec checked it
    return forward


def _bank_grad(backend: str) -> interface.ContrastBankGrad:
    bank_grad = _spec(backend).contrast_bank_grad
    assert bank_grad is not None  # a record with a contrast forward has both (Backend.__post_init__)
    return bank_grad


def _none(x: Tensor) -> Tensor:
    """The (0,) vector returned in place of a missing row's inverse norms."""
    return x.new_empty(0, dtype=acc_dtype(x))


@torch.library.custom_op("cdcl_ops::supcon_fwd", mutates_args=())
def supcon_fwd(q: Tensor, p: Tensor | None, k: Tensor | None, q_lab: Tensor, q_grp: Tensor,
               k_lab: Tensor, k_grp: Tensor, table: Tensor, inv_tau: float, denominator: str,
               backend: str, chunk_size: int, precision: str, need_u: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    inv_q = inverse_norms(q)
    inv_p = None if p is None else inverse_norms(p)
    inv_k = None if k is None else inverse_norms(k)
    rows = _forward(backend)(q, p, q if k is None else k,
                             InverseNorms(inv_q, inv_p, inv_q if inv_k is None else inv_k),
                             Masks(q_lab, q_grp, k_lab, k_grp, table),
                             Options(inv_tau, chunk_size, precision), Contrast(denominator, k is None),
                             need_u)
    # outputs may not alias one another: a missing row's norms are an empty vector
    return (*rows, inv_q, _none(q) if inv_p is None else inv_p, _none(q) if inv_k is None else inv_k)


@supcon_fwd.register_fake
def _(q, p, k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, denominator, backend, chunk_size,
      precision, need_u):
    n, d = q.shape
    acc = acc_dtype(q)

    def vector(rows=n, dtype=acc):
        return q.new_empty(rows, dtype=dtype)
    return (vector(), vector(), vector(dtype=torch.int32), vector(), vector(),
            q.new_empty((n if need_u else 0, d), dtype=acc), vector(),
            vector(0 if p is None else n), vector(0 if k is None else k.shape[0]))


@torch.library.custom_op("cdcl_ops::supcon_bank_grad", mutates_args=())
def supcon_bank_grad(q: Tensor, k: Tensor | None, inv_q: Tensor, inv_k: Tensor, q_lab: Tensor,
                     q_grp: Tensor, k_lab: Tensor, k_grp: Tensor, table: Tensor, lse: Tensor,
                     gs_lse: Tensor, gs_pos: Tensor, inv_tau: float, denominator: str, backend: str,
                     chunk_size: int, precision: str) -> Tensor:
    # 16-bit weights: both per-row factors divided by their largest magnitude, as in
    # cdcl_ops.ops.masked_infonce_bank_grad (why: there), dK scaled back afterwards
    both = torch.cat([gs_lse.abs(), gs_pos.abs()])
    g_scale = (both.amax() if both.numel() else gs_lse.new_ones(())).clamp_min(1e-30)
    rows, inv_rows = (q, inv_q) if k is None else (k, inv_k)
    dk_unit = _bank_grad(backend)(q, rows, InverseNorms(inv_q, None, inv_rows),
                                  Masks(q_lab, q_grp, k_lab, k_grp, table), lse, gs_lse / g_scale,
                                  gs_pos / g_scale, Options(inv_tau, chunk_size, precision),
                                  Contrast(denominator, k is None))
    return project_(rows, inv_rows, dk_unit.to(inv_rows.dtype)).mul_(g_scale).to(rows.dtype)


@supcon_bank_grad.register_fake
def _(q, k, inv_q, inv_k, q_lab, q_grp, k_lab, k_grp, table, lse, gs_lse, gs_pos, inv_tau,
      denominator, backend, chunk_size, precision):
    return torch.empty_like(q if k is None else k)


def _setup_context(ctx, inputs, output):
    (q, p, k, q_lab, q_grp, k_lab, k_grp, table, inv_tau, denominator, backend, chunk_size,
     precision, _) = inputs
    loss, lse, n_pos, lse_weight, pos_coef, u, inv_q, inv_p, inv_k = output
    need_q, _, need_k = ctx.needs_input_grad[:3]
    self_bank = k is None
    # the bank pass runs for a bank that requires grad, or for the queries as their own bank
    bank_pass = need_k or (self_bank and need_q)
    ctx.save_for_backward(q, p, k if need_k else None, lse if bank_pass else None, n_pos,
                          lse_weight, pos_coef, u if need_q else None, inv_q, inv_p, inv_k,
                          *Masks(q_lab, q_grp, k_lab, k_grp, table))
    ctx.self_bank, ctx.bank_pass, ctx.has_p = self_bank, bank_pass, p is not None
    ctx.backend, ctx.denominator = backend, denominator
    ctx.options = Options(inv_tau, chunk_size, precision)
    ctx.mark_non_differentiable(lse, n_pos, lse_weight, pos_coef, u, inv_q, inv_p, inv_k)
    # no zero gradients for the non-differentiable outputs: for u that would be an N x D buffer
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, *g_rest):
    q, p, k, lse, n_pos, lse_weight, pos_coef, u, inv_q, inv_p, inv_k, *masks = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)
    if g_loss is None:  # only reached through the non-differentiable outputs: nothing flows
        return (None,) * n_inputs
    options = ctx.options
    gs = g_loss.to(lse_weight.dtype) * options.inv_tau
    coef = gs * pos_coef
    dq = dp = dk = None
    if ctx.needs_input_grad[0]:
        if u.shape[0] != q.shape[0]:
            raise RuntimeError("supcon_fwd was called with need_u=False, so the query gradient is "
                               "unavailable; call it with need_u=True")
        g_unit = u * gs[:, None]
        if ctx.has_p:
            g_unit.addcmul_(p, (coef * inv_p)[:, None])
        dq = project_(q, inv_q, g_unit).to(q.dtype)
    if ctx.has_p and ctx.needs_input_grad[1]:
        dp = project_(p, inv_p, q.to(gs.dtype) * (coef * inv_q)[:, None]).to(p.dtype)
    if ctx.bank_pass:
        gs_pos = torch.where(n_pos > 0, gs / n_pos.clamp(min=1).to(gs.dtype), 0.0)
        d_bank = supcon_bank_grad(q, k, inv_q, inv_k, *masks, lse, gs * lse_weight, gs_pos,
                                  options.inv_tau, ctx.denominator, ctx.backend, options.chunk_size,
                                  options.precision)
        if ctx.self_bank:
            dq = d_bank if dq is None else dq + d_bank
        else:
            dk = d_bank
    return (dq, dp, dk) + (None,) * (n_inputs - 3)


supcon_fwd.register_autograd(_backward, setup_context=_setup_context)
