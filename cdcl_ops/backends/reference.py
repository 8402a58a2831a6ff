"""The materialising oracle: docs/design.md §2 written as directly as possible, differentiable by autograd."""
import torch

from .._validate import negative_mask
from ..normalize import EPS, power_of_two_scale
from .interface import Masks
from .registry import Backend


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(|x|, eps) per row, as F.normalize, for rows of any finite magnitude: each row is
    scaled by a power of two c first (exact; constant for autograd), so x c / max(|x c|, eps c)
    neither overflows nor underflows where x / max(|x|, eps) would."""
    c = power_of_two_scale(x.detach())
    y = x * c
    return y / torch.maximum(torch.linalg.vector_norm(y, dim=1, keepdim=True), EPS * c)


def per_query_loss(query: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor, masks: Masks,
                   temperature: float) -> torch.Tensor:
    """Per-query loss (N,) with autograd; builds the full N x M similarity matrix."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    qh = unit_rows(query.to(dtype))
    ph = unit_rows(positive.to(dtype))
    kh = unit_rows(bank.to(dtype))
    s_pos = (qh * ph).sum(-1) / temperature
    s = (qh @ kh.T) / temperature
    s = s.masked_fill(~negative_mask(masks), float("-inf"))
    lse = torch.logsumexp(torch.cat([s_pos[:, None], s], dim=1), dim=1)
    # lse == s_pos exactly for a row without negatives, so its loss is exactly 0
    return torch.where(masks.q_grp >= 0, lse - s_pos, torch.zeros_like(lse))


# no entry points: masked_infonce calls per_query_loss itself, and autograd differentiates it
RECORDS = (Backend("reference"),)
