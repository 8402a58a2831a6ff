"""Triton forward: per query tile, one streaming pass over bank tiles (online LSE and O_i).

The query rows reach the kernels already multiplied by 1/tau (`scaled_queries`), so a score is the
dot product itself, in natural-log units, with no multiply after it that the compiler could fuse
into the next subtraction: the bank gradient recomputes the same dot and subtracts the saved LSE,
and where s ~ 1/tau is large one rounding more or less there would move exp(s - LSE) by ~5e-4
(tau = 1e-4). Exponentials run in base 2 on the (small) differences only.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..normalize import unit_copy
from .interface import InverseNorms, Masks, Options
from .tl_utils import LOG2E, block_d, dot_precision, interpreting, negative_mask, query_codes


def scaled_queries(q: Tensor, inv_q: Tensor, inv_tau: float) -> Tensor:
    """The unit query rows times 1/tau, in q's dtype (fp16 holds them: 1/tau <= 1e4 by
    MIN_TEMPERATURE). The forward and the bank gradient both call this: the same numbers."""
    return unit_copy(q, inv_q * inv_tau)


@triton.jit
def _forward_kernel(Q, P, K, Q_LAB, Q_CODE, K_LAB, K_GRP, TABLE, LOSS, LSE, O,  # noqa: E741 (O of the maths)
                    N, M, D, G,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_BITS: tl.constexpr, NEED_O: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    n_ok = rn < N
    d_ok = rd < D
    q_off = rn.to(tl.int64)[:, None] * D + rd[None, :]
    q = tl.load(Q + q_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    p = tl.load(P + q_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter mis-handles 16-bit dots
        q = q.to(tl.float32)
    s_pos = tl.sum(q.to(tl.float32) * p.to(tl.float32), axis=1)  # q carries 1/tau
    q_lab = tl.load(Q_LAB + rn, mask=n_ok, other=0)
    q_code = tl.load(Q_CODE + rn, mask=n_ok, other=0)  # 0 (no allowed group) for padding rows

    m_i = s_pos                      # the positive seeds the running max: an empty row stays finite
    l_i = tl.full([BLOCK_N], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
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
        j = negative_mask(q_lab[:, None], q_code[:, None], k_lab[None, :], k_grp[None, :],
                          TABLE, G, USE_BITS)
        s = tl.where(j, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        e = tl.exp2((s - m_new[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(e, axis=1)
        if NEED_O:
            acc = acc * alpha[:, None] + tl.dot(e.to(k.dtype), k, input_precision=PRECISION)
        m_i = m_new

    log_l = tl.log(l_i)
    # (m_i - s_pos) is exactly 0 and log_l exactly 0 for a row without negatives: loss exactly 0
    tl.store(LOSS + rn, (m_i - s_pos) + log_l, mask=n_ok)
    tl.store(LSE + rn, m_i + log_l, mask=n_ok)
    if NEED_O:
        tl.store(O + q_off, acc / l_i[:, None], mask=n_ok[:, None] & d_ok[None, :])


def forward_config(bd: int, dtype: torch.dtype, precision: str) -> dict[str, int]:
    if interpreting():
        return dict(BLOCK_N=16, BLOCK_M=32, num_warps=4, num_stages=1)
    # measured on an H200 (benchmarks/triton_configs.py, paper and large sizes, D = 128)
    if bd <= 128:
        if dtype == torch.float32:
            # tf32x3 splits each operand in two: half the bank tile keeps it in shared memory
            return dict(BLOCK_N=128, BLOCK_M=32 if precision == "tf32x3" else 64, num_warps=8,
                        num_stages=3)
        return dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=3)
    if bd <= 256:
        return dict(BLOCK_N=64, BLOCK_M=32, num_warps=8, num_stages=2)
    if dtype == torch.float32:  # sized to fit sm_80's 163 KB of shared memory
        return dict(BLOCK_N=16, BLOCK_M=32, num_warps=4, num_stages=1)
    return dict(BLOCK_N=32, BLOCK_M=32, num_warps=8, num_stages=1)


def forward(q: Tensor, p: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, options: Options,
            need_o: bool, config: dict[str, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The entry point of backends.interface; config: launch parameters in place of
    `forward_config`'s (benchmarks/triton_configs.py sweeps them)."""
    n, d = q.shape
    m = k.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, dtype=torch.float32, device=q.device)
    o = torch.empty((n if need_o else 0, d), dtype=torch.float32, device=q.device)
    if n == 0:
        return loss, lse, o
    # the kernels take unit rows: transient copies, freed when the launch returns
    assert inv.p is not None  # only the bank gradient goes without the positives' norms
    q, p, k = scaled_queries(q, inv.q, options.inv_tau), unit_copy(p, inv.p), unit_copy(k, inv.k)
    q_lab, q_grp, k_lab, k_grp, table = masks
    codes, use_bits = query_codes(q_grp, table)
    table = table.to(torch.uint8)  # a bool pointer would load as i1
    bd = block_d(d)
    precision = dot_precision(q.dtype, options.precision)
    cfg = config or forward_config(bd, q.dtype, precision)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _forward_kernel[grid](
        q, p, k, q_lab, codes, k_lab, k_grp, table, loss, lse, o,
        n, m, d, table.shape[0],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=bd,
        USE_BITS=use_bits, NEED_O=need_o, PRECISION=precision,
        UPCAST=interpreting() and q.dtype != torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return loss, lse, o
