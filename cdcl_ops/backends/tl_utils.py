"""Small pieces shared by the Triton forward and bank-gradient kernels."""
import torch
import triton
import triton.language as tl

# one answer to "is Triton interpreting", the platform's; re-exported for the launch code
from .platform import triton_interpreting as interpreting  # noqa: F401

# kernels may only read constexpr globals; LOG2E is also used on the host
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_BITS_GROUPS = 32  # up to 32 groups a query's allowed bank groups fit one int32 bit set


@triton.jit
def candidate_mask(q_code, k_grp, TABLE, G, USE_BITS: tl.constexpr):
    """The pairs of a tile the groups allow between active rows, labels aside. Arguments arrive
    already broadcastable (q side on one axis, bank on the other).

    q_code is the query's bit set of allowed bank groups (USE_BITS) or its group id (-1 inactive).
    """
    ok = k_grp >= 0
    if USE_BITS:
        ok = ok & (((q_code >> tl.maximum(k_grp, 0)) & 1) != 0)
    else:
        ok = ok & (q_code >= 0)
        allowed = tl.load(TABLE + tl.maximum(q_code, 0) * G + tl.maximum(k_grp, 0), mask=ok, other=0)
        ok = ok & (allowed != 0)
    return ok


@triton.jit
def negative_mask(q_lab, q_code, k_lab, k_grp, TABLE, G, USE_BITS: tl.constexpr):
    """J for a tile: the allowed pairs (candidate_mask) whose labels differ."""
    return candidate_mask(q_code, k_grp, TABLE, G, USE_BITS) & (q_lab != k_lab)


def query_codes(q_grp: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Per-query code for `negative_mask`: a bit set when G <= 32, else the group id itself."""
    g = table.shape[0]
    if g > MAX_BITS_GROUPS:
        return q_grp, False
    weights = torch.bitwise_left_shift(
        torch.ones(g, dtype=torch.int64, device=table.device), torch.arange(g, device=table.device))
    rows = (table.to(torch.int64) * weights).sum(dim=1)            # (G,)
    bits = rows[q_grp.clamp(min=0).long()]
    bits = torch.where(q_grp >= 0, bits, torch.zeros_like(bits))
    # values >= 2**31 wrap to negative int32: only the bit pattern matters
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).contiguous(), True


def dot_precision(dtype: torch.dtype, precision: str) -> str:
    """Triton's input_precision for the kernels' dots.

    For fp32 operands "auto" means TF32 where torch.backends.cuda.matmul.allow_tf32 allows it, and
    otherwise "tf32x3": three TF32 products that recover fp32 accuracy on the tensor cores. Plain
    "ieee" (FMA units) stays available but measured about 100x slower on an H200.
    """
    if dtype != torch.float32:
        return "ieee"  # ignored for 16-bit operands
    if precision == "auto":
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return precision


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))
