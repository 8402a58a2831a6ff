"""Triton bank gradient: per bank tile, one streaming pass over query tiles, recomputing
pi_ij = J_ij exp(s_ij - LSE_i) from the saved LSE. Each program owns its rows of dK, so the
sum over queries runs in a fixed order without atomics (deterministic). The queries come scaled
by 1/tau exactly as the forward had them (triton_forward.scaled_queries), so s_ij is the forward's
number; the accumulated sum carries that 1/tau and is multiplied by tau at the end."""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..normalize import unit_copy
from .interface import InverseNorms, Masks, Options
from .tl_utils import LOG2E, block_d, dot_precision, interpreting, negative_mask, query_codes
from .triton_forward import scaled_queries


@triton.jit
def _bank_grad_kernel(Q, K, Q_LAB, Q_CODE, K_LAB, K_GRP, TABLE, LSE, GS, DK,
                      N, M, D, G, tau,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      USE_BITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
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
        gs = tl.load(GS + rn, mask=n_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)   # (BLOCK_M, BLOCK_N), q carries 1/tau
        j = negative_mask(q_lab[None, :], q_code[None, :], k_lab[:, None], k_grp[:, None],
                          TABLE, G, USE_BITS)
        # masked before the exponential: outside J, s - LSE may be ~2/tau and exp2 would overflow
        w = tl.exp2(tl.where(j, st - lse[None, :], float("-inf")) * LOG2E) * gs[None, :]
        acc += tl.dot(w.to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + k_off, (acc * tau).to(DK.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def bank_grad_config(bd: int, dtype: torch.dtype, precision: str) -> dict[str, int]:
    if interpreting():
        return dict(BLOCK_N=32, BLOCK_M=16, num_warps=4, num_stages=1)
    if bd <= 64:
        return dict(BLOCK_N=64, BLOCK_M=128, num_warps=4, num_stages=3)
    # measured on an H200 (benchmarks/triton_configs.py, paper and large sizes, D = 128)
    if bd <= 128:
        if dtype == torch.float32:
            return dict(BLOCK_N=32 if precision == "tf32x3" else 64, BLOCK_M=128, num_warps=8,
                        num_stages=3)
        return dict(BLOCK_N=32, BLOCK_M=64, num_warps=4, num_stages=3)
    if bd <= 256:
        return dict(BLOCK_N=32, BLOCK_M=64, num_warps=8, num_stages=2)
    if dtype == torch.float32:  # sized to fit sm_80's 163 KB of shared memory
        return dict(BLOCK_N=32, BLOCK_M=16, num_warps=4, num_stages=1)
    return dict(BLOCK_N=32, BLOCK_M=32, num_warps=8, num_stages=1)


def bank_grad(q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor, gs: Tensor,
              options: Options, config: dict[str, int] | None = None) -> Tensor:
    """The entry point of backends.interface; config: launch parameters in place of
    `bank_grad_config`'s (benchmarks/triton_configs.py sweeps them)."""
    n, d = q.shape
    m = k.shape[0]
    dk = torch.empty((m, d), dtype=torch.float32, device=k.device)  # fp32 for the projection
    if m == 0:
        return dk
    # the kernel takes unit rows: transient copies, freed when the launch returns
    q, k = scaled_queries(q, inv.q, options.inv_tau), unit_copy(k, inv.k)
    q_lab, q_grp, k_lab, k_grp, table = masks
    codes, use_bits = query_codes(q_grp, table)
    table = table.to(torch.uint8)  # a bool pointer would load as i1
    bd = block_d(d)
    precision = dot_precision(q.dtype, options.precision)
    cfg = config or bank_grad_config(bd, q.dtype, precision)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _bank_grad_kernel[grid](
        q, k, q_lab, codes, k_lab, k_grp, table, lse, gs.to(torch.float32).contiguous(), dk,
        n, m, d, table.shape[0], 1.0 / options.inv_tau,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=bd,
        USE_BITS=use_bits, PRECISION=precision,
        UPCAST=interpreting() and q.dtype != torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dk
