"""Triton kernels of the supervised contrastive loss (docs/design.md §7): the forward, per query
tile, and the bank gradient, per bank tile, each streaming the other side's tiles.

The forward keeps, per query, the online log-sum-exp over its set (P u N for "all", N for
"negatives"), O over that set, and the positives' count; "all" also sums the positives' scores
and rows in the same pass. "negatives" runs a second loop over the bank in the same program once
the negatives' log-sum-exp L is final: per positive softplus(L - s) (its loss term) and
sigmoid(L - s) (its weight). As in triton_forward, the queries come multiplied by 1/tau
(`scaled_queries`), so the bank gradient recomputes the forward's scores, and exponentials run in
base 2; every masked lane is masked before its exponential (no inf - inf, no overflow).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..normalize import unit_copy
from .interface import Contrast, ContrastRows, InverseNorms, Masks, Options
from .tl_utils import LOG2E, block_d, candidate_mask, dot_precision, interpreting, query_codes
from .triton_backward import bank_grad_config
from .triton_forward import forward_config, scaled_queries


@triton.jit
def _softplus_sigmoid(t):
    """softplus(t) = log(1 + e^t) and sigmoid(t), from e = e^-|t| (no overflow); log(1 + e) as
    2 atanh(e / (2 + e)), its odd series to the 15th power (relative error below 2e-8, where
    log(1 + e) would lose e below fp32's epsilon). t = -inf gives exactly 0 for both."""
    e = tl.exp2(-tl.abs(t) * LOG2E)
    z = e / (2.0 + e)
    z2 = z * z
    p = 1.0 / 15.0
    p = p * z2 + 1.0 / 13.0
    p = p * z2 + 1.0 / 11.0
    p = p * z2 + 1.0 / 9.0
    p = p * z2 + 1.0 / 7.0
    p = p * z2 + 1.0 / 5.0
    p = p * z2 + 1.0 / 3.0
    p = p * z2 + 1.0
    softplus = tl.maximum(t, 0.0) + 2.0 * z * p
    sigmoid = tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return softplus, sigmoid


@triton.jit
def _tile_masks(rn, rm, q_lab, q_code, k_lab, k_grp, TABLE, G, USE_BITS: tl.constexpr,
                EXCLUDE_SELF: tl.constexpr):
    """(positives, negatives) of query rows rn (axis 0) against bank rows rm (axis 1)."""
    cand = candidate_mask(q_code[:, None], k_grp[None, :], TABLE, G, USE_BITS)
    if EXCLUDE_SELF:
        cand = cand & (rn[:, None] != rm[None, :])
    same = q_lab[:, None] == k_lab[None, :]
    return cand & same, cand & (q_lab[:, None] != k_lab[None, :])


@triton.jit
def _contrast_forward_kernel(Q, P, K, Q_LAB, Q_GRP, Q_CODE, K_LAB, K_GRP, TABLE,
                             LOSS, LSE, N_POS, LSE_W, POS_COEF, U,
                             N, M, D, G,
                             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                             USE_BITS: tl.constexpr, HAS_P: tl.constexpr, ALL: tl.constexpr,
                             EXCLUDE_SELF: tl.constexpr, NEED_U: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    n_ok = rn < N
    d_ok = rd < D
    q_off = rn.to(tl.int64)[:, None] * D + rd[None, :]
    q = tl.load(Q + q_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter mis-handles 16-bit dots
        q = q.to(tl.float32)
    q_lab = tl.load(Q_LAB + rn, mask=n_ok, other=0)
    q_code = tl.load(Q_CODE + rn, mask=n_ok, other=0)  # 0 (no allowed group) for padding rows
    active = tl.load(Q_GRP + rn, mask=n_ok, other=-1) >= 0
    neg_inf = float("-inf")
    if HAS_P:
        p = tl.load(P + q_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s_pair = tl.sum(q.to(tl.float32) * p.to(tl.float32), axis=1)  # q carries 1/tau
        paired = active
    else:
        s_pair = tl.zeros([BLOCK_N], tl.float32)
        paired = rn < 0  # nobody
    if ALL:  # the paired positive is in the log-sum-exp's set, and seeds it
        m_i = tl.where(paired, s_pair, neg_inf)
        l_i = tl.where(paired, 1.0, 0.0)
    else:
        m_i = tl.full([BLOCK_N], neg_inf, tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
    pos_score = tl.where(paired, s_pair, 0.0)
    count = paired.to(tl.int32)
    acc_o = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    acc_p = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # "all": the positives' rows; else pass 2's

    for start in range(0, M, BLOCK_M):
        rm = start + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        k = tl.load(K + rm.to(tl.int64)[:, None] * D + rd[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        k_lab = tl.load(K_LAB + rm, mask=m_ok, other=-1)
        k_grp = tl.load(K_GRP + rm, mask=m_ok, other=-1)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        pos, neg = _tile_masks(rn, rm, q_lab, q_code, k_lab, k_grp, TABLE, G, USE_BITS, EXCLUDE_SELF)
        count += tl.sum(pos.to(tl.int32), axis=1)
        if ALL:
            in_set = pos | neg
        else:
            in_set = neg
        m_new = tl.maximum(m_i, tl.max(tl.where(in_set, s, neg_inf), axis=1))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)  # nothing seen yet: the sums stay 0
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        e = tl.exp2(tl.where(in_set, s - m_safe[:, None], neg_inf) * LOG2E)
        l_i = l_i * alpha + tl.sum(e, axis=1)
        if NEED_U:
            acc_o = acc_o * alpha[:, None] + tl.dot(e.to(k.dtype), k, input_precision=PRECISION)
        if ALL:
            pos_score += tl.sum(tl.where(pos, s, 0.0), axis=1)
            if NEED_U:
                acc_p += tl.dot(pos.to(k.dtype), k, input_precision=PRECISION)
        m_i = m_new

    log_l = tl.log(tl.maximum(l_i, 1.0))  # l_i is 0 (empty set, m_i = -inf) or >= 1
    lse = m_i + log_l
    has = count > 0
    inv_count = tl.where(has, 1.0 / tl.maximum(count, 1).to(tl.float32), 0.0)
    o_mean = acc_o / tl.maximum(l_i, 1.0)[:, None]
    if ALL:
        loss = tl.where(has, (m_i - pos_score * inv_count) + log_l, 0.0)
        lse_w = tl.where(has, 1.0, 0.0)
        pos_coef = tl.where(paired, tl.exp2(tl.where(paired, s_pair - lse, 0.0) * LOG2E) - inv_count, 0.0)
        u = tl.where(has[:, None], o_mean - acc_p * inv_count[:, None], 0.0)
    else:
        # pass 2: each positive against the negatives' final log-sum-exp L (none: loss 0)
        live = has & (lse != neg_inf)
        big_l = tl.where(live, lse, 0.0)
        soft = tl.zeros([BLOCK_N], tl.float32)
        sig = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, M, BLOCK_M):
            rm = start + tl.arange(0, BLOCK_M)
            m_ok = rm < M
            k = tl.load(K + rm.to(tl.int64)[:, None] * D + rd[None, :],
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            k_lab = tl.load(K_LAB + rm, mask=m_ok, other=-1)
            k_grp = tl.load(K_GRP + rm, mask=m_ok, other=-1)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            pos, _ = _tile_masks(rn, rm, q_lab, q_code, k_lab, k_grp, TABLE, G, USE_BITS, EXCLUDE_SELF)
            pos = pos & live[:, None]
            sp, sg = _softplus_sigmoid(tl.where(pos, big_l[:, None] - s, 0.0))
            soft += tl.sum(tl.where(pos, sp, 0.0), axis=1)
            w = tl.where(pos, sg, 0.0)
            sig += tl.sum(w, axis=1)
            if NEED_U:
                acc_p += tl.dot(w.to(k.dtype), k, input_precision=PRECISION)
        sp_pair, sg_pair = _softplus_sigmoid(big_l - s_pair)
        pair_live = paired & live
        soft += tl.where(pair_live, sp_pair, 0.0)
        sig_pair = tl.where(pair_live, sg_pair, 0.0)
        sig += sig_pair
        loss = tl.where(live, soft * inv_count, 0.0)
        lse_w = tl.where(live, sig * inv_count, 0.0)
        pos_coef = -sig_pair * inv_count
        u = tl.where(live[:, None], o_mean * lse_w[:, None] - acc_p * inv_count[:, None], 0.0)

    tl.store(LOSS + rn, loss, mask=n_ok)
    tl.store(LSE + rn, lse, mask=n_ok)
    tl.store(N_POS + rn, count, mask=n_ok)
    tl.store(LSE_W + rn, lse_w, mask=n_ok)
    tl.store(POS_COEF + rn, pos_coef, mask=n_ok)
    if NEED_U:
        tl.store(U + q_off, u, mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _contrast_bank_grad_kernel(Q, K, Q_LAB, Q_CODE, K_LAB, K_GRP, TABLE, LSE, GS_LSE, GS_POS, DK,
                               N, M, D, G, tau,
                               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                               USE_BITS: tl.constexpr, ALL: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < M
    d_ok = rd < D
    k_off = rm.to(tl.int64)[:, None] * D + rd[None, :]
    k = tl.load(K + k_off, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    k_lab = tl.load(K_LAB + rm, mask=m_ok, other=-1)
    k_grp = tl.load(K_GRP + rm, mask=m_ok, other=-1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        q = tl.load(Q + rn.to(tl.int64)[:, None] * D + rd[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_lab = tl.load(Q_LAB + rn, mask=n_ok, other=0)
        q_code = tl.load(Q_CODE + rn, mask=n_ok, other=0)
        lse = tl.load(LSE + rn, mask=n_ok, other=0.0)
        gl = tl.load(GS_LSE + rn, mask=n_ok, other=0.0)
        gp = tl.load(GS_POS + rn, mask=n_ok, other=0.0)
        st = tl.dot(q, tl.trans(k), input_precision=PRECISION)   # (BLOCK_N, BLOCK_M), q carries 1/tau
        pos, neg = _tile_masks(rn, rm, q_lab, q_code, k_lab, k_grp, TABLE, G, USE_BITS, EXCLUDE_SELF)
        if ALL:
            in_set = pos | neg
        else:
            in_set = neg
        # masked before the exponential: outside the set, lse may be -inf
        w = tl.exp2(tl.where(in_set, st - lse[:, None], float("-inf")) * LOG2E) * gl[:, None]
        if ALL:
            w -= tl.where(pos, gp[:, None], 0.0)
        else:
            _, sg = _softplus_sigmoid(tl.where(pos, lse[:, None] - st, 0.0))
            w -= tl.where(pos, gp[:, None] * sg, 0.0)
        acc += tl.dot(tl.trans(w).to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + k_off, (acc * tau).to(DK.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def contrast_forward_config(bd: int, dtype: torch.dtype, precision: str) -> dict[str, int]:
    """The masked InfoNCE forward's launch parameters with half the query tile: a program here
    keeps two (BLOCK_N, BLOCK_D) accumulators. Not yet measured on a GPU."""
    cfg = dict(forward_config(bd, dtype, precision))
    if not interpreting():
        cfg["BLOCK_N"] = max(16, cfg["BLOCK_N"] // 2)
    return cfg


def forward(q: Tensor, p: Tensor | None, k: Tensor, inv: InverseNorms, masks: Masks,
            options: Options, contrast: Contrast, need_u: bool,
            config: dict[str, int] | None = None) -> ContrastRows:
    """The ContrastForward entry point of backends.interface."""
    n, d = q.shape
    m = k.shape[0]

    def vector(dtype=torch.float32):
        return torch.empty(n, dtype=dtype, device=q.device)
    loss, lse, lse_w, pos_coef, n_pos = vector(), vector(), vector(), vector(), vector(torch.int32)
    u = torch.empty((n if need_u else 0, d), dtype=torch.float32, device=q.device)
    rows = ContrastRows(loss, lse, n_pos, lse_w, pos_coef, u)
    if n == 0:
        return rows
    # the kernel takes unit rows: transient copies, freed when the launch returns
    q_unit = scaled_queries(q, inv.q, options.inv_tau)
    k_unit = unit_copy(k, inv.k)
    p_unit = unit_copy(p, inv.p) if p is not None else q_unit  # a placeholder HAS_P never reads
    q_lab, q_grp, k_lab, k_grp, table = masks
    codes, use_bits = query_codes(q_grp, table)
    table = table.to(torch.uint8)  # a bool pointer would load as i1
    bd = block_d(d)
    precision = dot_precision(q_unit.dtype, options.precision)
    cfg = config or contrast_forward_config(bd, q_unit.dtype, precision)
    _contrast_forward_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        q_unit, p_unit, k_unit, q_lab, q_grp, codes, k_lab, k_grp, table,
        loss, lse, n_pos, lse_w, pos_coef, u,
        n, m, d, table.shape[0],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=bd, USE_BITS=use_bits,
        HAS_P=p is not None, ALL=contrast.denominator == "all", EXCLUDE_SELF=contrast.exclude_self,
        NEED_U=need_u, PRECISION=precision, UPCAST=interpreting() and q_unit.dtype != torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return rows


def bank_grad(q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor, gs_lse: Tensor,
              gs_pos: Tensor, options: Options, contrast: Contrast,
              config: dict[str, int] | None = None) -> Tensor:
    """The ContrastBankGrad entry point of backends.interface; the masked InfoNCE bank
    gradient's launch parameters (the same two products per tile)."""
    n, d = q.shape
    m = k.shape[0]
    dk = torch.empty((m, d), dtype=torch.float32, device=k.device)  # fp32 for the projection
    if m == 0:
        return dk
    q_unit, k_unit = scaled_queries(q, inv.q, options.inv_tau), unit_copy(k, inv.k)
    q_lab, q_grp, k_lab, k_grp, table = masks
    codes, use_bits = query_codes(q_grp, table)
    table = table.to(torch.uint8)
    bd = block_d(d)
    precision = dot_precision(q_unit.dtype, options.precision)
    cfg = config or bank_grad_config(bd, q_unit.dtype, precision)
    _contrast_bank_grad_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        q_unit, k_unit, q_lab, codes, k_lab, k_grp, table, lse.to(torch.float32).contiguous(),
        gs_lse.to(torch.float32).contiguous(), gs_pos.to(torch.float32).contiguous(), dk,
        n, m, d, table.shape[0], 1.0 / options.inv_tau,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=bd, USE_BITS=use_bits,
        ALL=contrast.denominator == "all", EXCLUDE_SELF=contrast.exclude_self,
        PRECISION=precision, UPCAST=interpreting() and q_unit.dtype != torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dk
