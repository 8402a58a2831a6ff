"""The materialising oracle: docs/design.md §2 written as directly as possible, differentiable by autograd."""
import torch

from .._validate import contrast_masks, negative_mask
from ..normalize import EPS, power_of_two_scale
from .interface import LOSSES, Masks
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


def contrast_per_query(query: torch.Tensor, positive: torch.Tensor | None, bank: torch.Tensor | None,
                       masks: Masks, temperature: float, denominator: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised contrastive loss per query (N,) with autograd, and |P_i| (N,), from the full
    N x M matrix (docs/design.md §7). bank=None: the queries are the bank, row i left out of
    query i's sets (masks' bank side is then the queries')."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    qh = unit_rows(query.to(dtype))
    kh = qh if bank is None else unit_rows(bank.to(dtype))
    pos, neg = contrast_masks(masks, exclude_self=bank is None)
    s = (qh @ kh.T) / temperature
    active = masks.q_grp >= 0
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=s.device)
    n_pos = pos.sum(1)
    if positive is not None:
        # the paired positive joins P_i: its score as one more column, in every sum below
        s_pos = (qh * unit_rows(positive.to(dtype))).sum(-1) / temperature
        s = torch.cat([s_pos[:, None], s], dim=1)
        pos = torch.cat([active[:, None], pos], dim=1)
        neg = torch.cat([torch.zeros_like(active)[:, None], neg], dim=1)
        n_pos = n_pos + active
    count = n_pos.clamp(min=1).to(dtype)
    if denominator == "all":
        lse = torch.logsumexp(torch.where(pos | neg, s, neg_inf), dim=1)
        per_q = lse - torch.where(pos, s, 0.0).sum(1) / count
    else:
        lse = torch.logsumexp(torch.where(neg, s, neg_inf), dim=1)  # -inf without negatives
        # -log(e^s / (e^s + e^lse)) per positive; logaddexp(-inf, s) = s: 0 without negatives
        terms = torch.where(pos, torch.logaddexp(lse[:, None], s) - s, 0.0)
        per_q = terms.sum(1) / count
    # a query without a positive: exactly 0, and nothing (not even NaN) flows back through it
    return torch.where(n_pos > 0, per_q, 0.0), n_pos


# no entry points: the losses call per_query_loss and contrast_per_query themselves, and
# autograd differentiates them
RECORDS = (Backend("reference", losses=LOSSES),)
