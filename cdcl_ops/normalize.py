"""Row L2 normalisation folded into the op: inverse norms forward, the projection backward.

The op never keeps (or, for the native kernels, never makes) a normalised copy of its inputs: the
kernels read the raw rows and scale them by 1 / max(|x|, eps) (as F.normalize), and backward
turns the gradient with respect to the unit rows into the gradient with respect to the raw rows
in place. What is kept for backward is N + N + M floats.
"""
import torch

EPS = 1e-12  # as F.normalize


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(|x_i|, eps) per row, in fp32 (fp64 for fp64 rows)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=acc_dtype(x)).clamp_min(EPS).reciprocal()


def unit_copy(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """The unit rows x * inv as a new contiguous tensor in x's dtype, for kernels that take them."""
    return (x.to(inv.dtype) * inv[:, None]).to(x.dtype).contiguous()


def project_(x: torch.Tensor, inv: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to the raw rows x, given g, the gradient with respect to x * inv.

    d(x/|x|) = (g - u (u.g)) / |x| with u = x/|x|, i.e. inv * g - x * inv^3 (x.g); where the norm
    was clamped to eps the map is x / eps and its gradient g / eps. Overwrites g (which must be in
    inv's dtype) and returns it.
    """
    x = x.to(g.dtype)  # no copy for fp32/fp64 rows
    dot = torch.bmm(x.unsqueeze(1), g.unsqueeze(2)).view(-1)  # row dot products, no (N, D) temporary
    coef = torch.where(inv < 1.0 / EPS, inv * inv * inv * dot, torch.zeros_like(dot))
    return g.mul_(inv[:, None]).addcmul_(x, coef[:, None], value=-1.0)
