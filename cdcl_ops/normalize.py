"""Row L2 normalisation folded into the op: inverse norms forward, the projection backward.

The op never keeps (or, for the native kernels, never makes) a normalised copy of its inputs: the
kernels read the raw rows and scale them by 1 / max(|x|, eps) (as F.normalize), and backward
turns the gradient with respect to the unit rows into the gradient with respect to the raw rows
in place. What is kept for backward is N + N + M floats.

Rows of any finite magnitude are handled: the squares of a float32 row near the float32 maximum
overflow float32, so norms are accumulated in float64 (float64 rows are first scaled by a power of
two, which is exact). An inverse norm below 2**-126 (a row norm above ~8.5e37) is a float32
subnormal with fewer significant bits, as the exact value requires.
"""
from __future__ import annotations

import torch

EPS = 1e-12  # as F.normalize


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def power_of_two_scale(x: torch.Tensor) -> torch.Tensor:
    """(rows, 1) powers of two c with max |x_i c| in [0.5, 1) (1 for zero and non-finite rows; for
    subnormal rows as close as a finite c gets): x * c is exact, and its squares neither overflow
    nor underflow. x is float32 or float64."""
    peak = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True)
    _, exponent = torch.frexp(peak)
    top = 126 if x.dtype == torch.float32 else 1022  # c and eps * c stay finite
    exponent = (-exponent).clamp(max=top).to(x.dtype)
    usable = (peak > 0) & torch.isfinite(peak)
    return torch.where(usable, torch.exp2(exponent), torch.ones_like(peak))  # exp2 of an integer: exact


def norms(x: torch.Tensor) -> torch.Tensor:
    """|x_i| per row, in float64, without overflow or underflow for any finite row."""
    if x.dtype != torch.float64:
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    c = power_of_two_scale(x)
    return torch.linalg.vector_norm(x * c, dim=1) / c.squeeze(1)


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(|x_i|, eps) per row, in fp32 (fp64 for fp64 rows)."""
    return norms(x).clamp_min(EPS).reciprocal().to(acc_dtype(x))


def unit_copy(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """The unit rows x * inv as a new contiguous tensor in x's dtype, for kernels that take them."""
    return (x.to(inv.dtype) * inv[:, None]).to(x.dtype).contiguous()


def project_(x: torch.Tensor, inv: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to the raw rows x, given g, the gradient with respect to x * inv.

    d(x/|x|) = (g - u (u.g)) / |x| with u = x/|x|; where the norm was clamped to eps the map is
    x / eps and its gradient g / eps. Overwrites g (which must be in inv's dtype) and returns it.
    The unit rows u are formed first (one transient (N, D) buffer): x.g itself overflows float32
    for rows near the float32 maximum, and inv**3 underflows for rows above ~1e13.
    """
    u = x.to(g.dtype) * inv[:, None]
    ug = torch.bmm(u.unsqueeze(1), g.unsqueeze(2)).view(-1)  # row dot products
    ug = torch.where(inv < 1.0 / EPS, ug, torch.zeros_like(ug))
    return g.addcmul_(u, ug[:, None], value=-1.0).mul_(inv[:, None])
