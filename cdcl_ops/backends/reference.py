"""The materialising oracle: SPEC 2.1 written as directly as possible, differentiable by autograd."""
import torch
import torch.nn.functional as F

from .._validate import negative_mask


def per_query_loss(query, positive, bank, q_lab, q_grp, k_lab, k_grp, table, temperature):
    """Per-query loss (N,) with autograd; builds the full N x M similarity matrix."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    qh = F.normalize(query.to(dtype), dim=-1)
    ph = F.normalize(positive.to(dtype), dim=-1)
    kh = F.normalize(bank.to(dtype), dim=-1)
    s_pos = (qh * ph).sum(-1) / temperature
    s = (qh @ kh.T) / temperature
    s = s.masked_fill(~negative_mask(q_lab, q_grp, k_lab, k_grp, table), float("-inf"))
    lse = torch.logsumexp(torch.cat([s_pos[:, None], s], dim=1), dim=1)
    # lse == s_pos exactly for a row without negatives, so its loss is exactly 0
    return torch.where(q_grp >= 0, lse - s_pos, torch.zeros_like(lse))
