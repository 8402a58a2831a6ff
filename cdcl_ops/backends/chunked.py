"""Pure-PyTorch streaming backend: tiles of queries x bank chunks, online log-sum-exp.

Peak memory is a few (query tile x bank chunk) buffers; only LSE (N) and O (N, D) are kept for
backward, as in docs/design.md §3. Works on any device and dtype (fp64 included, used by gradcheck).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import contrast_masks, negative_mask
from ..normalize import acc_dtype
from .interface import LOSSES, Contrast, ContrastRows, InverseNorms, Masks, Options
from .registry import Backend

QUERY_TILE = 4096
DEFAULT_CHUNK = 2048


def _tiles(n, size):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _unit(x, inv, a, b, acc):
    return x[a:b].to(acc) * inv[a:b, None]


def forward(q: Tensor, p: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, options: Options,
            need_o: bool) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(q)
    n, d = q.shape
    chunk = options.chunk_size or DEFAULT_CHUNK
    inv_tau = options.inv_tau
    loss = torch.empty(n, dtype=acc, device=q.device)
    lse = torch.empty(n, dtype=acc, device=q.device)
    o = torch.empty((n if need_o else 0, d), dtype=acc, device=q.device)
    for a, b in _tiles(n, QUERY_TILE):
        qt = _unit(q, inv.q, a, b, acc)
        s_pos = (qt * _unit(p, inv.p, a, b, acc)).sum(-1) * inv_tau
        m_run = s_pos.clone()  # seeding the max with s+ keeps empty rows finite
        l_run = torch.ones_like(s_pos)
        o_run = torch.zeros_like(qt) if need_o else None
        for c0, c1 in _tiles(k.shape[0], chunk):
            kc = _unit(k, inv.k, c0, c1, acc)
            s = (qt @ kc.T) * inv_tau
            s.masked_fill_(~negative_mask(masks.tile(a, b, c0, c1)), float("-inf"))
            m_new = torch.maximum(m_run, s.amax(dim=1))
            alpha = torch.exp(m_run - m_new)
            e = torch.exp(s - m_new[:, None])
            l_run = l_run * alpha + e.sum(dim=1)
            if o_run is not None:
                o_run = o_run * alpha[:, None] + e @ kc
            m_run = m_new
        log_l = torch.log(l_run)
        loss[a:b] = (m_run - s_pos) + log_l
        lse[a:b] = m_run + log_l
        if o_run is not None:
            o[a:b] = o_run / l_run[:, None]
    return loss, lse, o


def bank_grad(q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor, gs: Tensor,
              options: Options) -> Tensor:
    acc = acc_dtype(q)
    chunk = options.chunk_size or DEFAULT_CHUNK
    inv_tau = options.inv_tau
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    # fixed loop order and no atomics: the result is bit-identical run to run
    for a, b in _tiles(q.shape[0], QUERY_TILE):
        qt = _unit(q, inv.q, a, b, acc)
        for c0, c1 in _tiles(k.shape[0], chunk):
            kc = _unit(k, inv.k, c0, c1, acc)
            s = (qt @ kc.T) * inv_tau
            w = torch.exp(s - lse[a:b, None]) * gs[a:b, None]
            w.masked_fill_(~negative_mask(masks.tile(a, b, c0, c1)), 0)
            dk[c0:c1] += w.T @ qt
    return dk


def _online_max(m_run, s):
    """The new running maximum and the factor exp(m_old - m_new) for the running sums; both
    maxima may be -inf (nothing seen yet), where the factor is 1 (the sums are 0 then)."""
    m_new = torch.maximum(m_run, s.amax(dim=1)) if s.shape[1] else m_run
    alpha = torch.where(m_new == float("-inf"), 1.0, torch.exp(m_run - m_new))
    return m_new, alpha


def _exp_shifted(s, m):
    """exp(s - m) per row, exactly 0 where s is -inf (also where m is: nothing seen)."""
    return torch.where(s == float("-inf"), 0.0, torch.exp(s - m[:, None]))


def contrast_forward(q: Tensor, p: Tensor | None, k: Tensor, inv: InverseNorms, masks: Masks,
                     options: Options, contrast: Contrast, need_u: bool) -> ContrastRows:
    """docs/design.md §7: "all" in one pass over the bank (the online log-sum-exp over P u N with
    its O, and the positives' count, score sum and row sum); "negatives" in two (the negatives'
    log-sum-exp and O, then the positives against the final log-sum-exp)."""
    acc = acc_dtype(q)
    n, d = q.shape
    m = k.shape[0]
    chunk = options.chunk_size or DEFAULT_CHUNK
    inv_tau = options.inv_tau
    neg_inf = float("-inf")
    rows = [torch.empty(n, dtype=acc, device=q.device) for _ in range(4)]
    loss, lse, lse_weight, pos_coef = rows
    n_pos = torch.empty(n, dtype=torch.int32, device=q.device)
    u = torch.empty((n if need_u else 0, d), dtype=acc, device=q.device)
    over_all = contrast.denominator == "all"
    for a, b in _tiles(n, QUERY_TILE):
        qt = _unit(q, inv.q, a, b, acc)
        active = masks.q_grp[a:b] >= 0
        paired = active if p is not None else torch.zeros_like(active)
        s_pair = (qt * _unit(p, inv.p, a, b, acc)).sum(-1) * inv_tau if p is not None \
            else torch.zeros(b - a, dtype=acc, device=q.device)
        count = paired.to(torch.int32)
        # pass 1: the log-sum-exp over P u N ("all", the paired positive seeding it) or N
        m_run = torch.where(paired, s_pair, neg_inf) if over_all else torch.full_like(s_pair, neg_inf)
        l_run = paired.to(acc) if over_all else torch.zeros_like(s_pair)
        o_run = torch.zeros_like(qt) if need_u else None
        pos_score = torch.where(paired, s_pair, 0.0)   # "all": sum of the positives' scores
        pos_rows = torch.zeros_like(qt) if need_u and over_all else None  # and of their rows
        for c0, c1 in _tiles(m, chunk):
            kc = _unit(k, inv.k, c0, c1, acc)
            s = (qt @ kc.T) * inv_tau
            pos, neg = contrast_masks(masks.tile(a, b, c0, c1), contrast.exclude_self, a, c0)
            count = count + pos.sum(1, dtype=torch.int32)
            s_set = s.masked_fill(~((pos | neg) if over_all else neg), neg_inf)
            m_run, alpha = _online_max(m_run, s_set)
            e = _exp_shifted(s_set, m_run)
            l_run = l_run * alpha + e.sum(dim=1)
            if o_run is not None:
                o_run = o_run * alpha[:, None] + e @ kc
            if over_all:
                pos_score = pos_score + s.masked_fill(~pos, 0.0).sum(1)
                if pos_rows is not None:
                    pos_rows = pos_rows + pos.to(acc) @ kc
        has_pos = count > 0
        n_pos[a:b] = count
        inv_count = torch.where(has_pos, 1.0 / count.clamp(min=1).to(acc), 0.0)
        log_l = torch.log(l_run)
        lse[a:b] = m_run + log_l
        o_mean = o_run / l_run.clamp(min=torch.finfo(acc).tiny)[:, None] if o_run is not None else None
        if over_all:
            # (m - mean) + log l: the large terms cancel before the small one is added
            loss[a:b] = torch.where(has_pos, (m_run - pos_score * inv_count) + log_l, 0.0)
            lse_weight[a:b] = has_pos.to(acc)
            pos_coef[a:b] = torch.where(paired, torch.exp(s_pair - lse[a:b]) - inv_count, 0.0)
            if need_u:
                u[a:b] = torch.where(has_pos[:, None], o_mean - pos_rows * inv_count[:, None], 0.0)
            continue
        # pass 2 ("negatives"): each positive against the negatives' final log-sum-exp L:
        # -log(e^s / (e^s + e^L)) = softplus(L - s), whose derivative by s is -sigmoid(L - s)
        big_l = lse[a:b]
        t_pair = big_l - s_pair
        soft = torch.where(paired, torch.logaddexp(t_pair, torch.zeros_like(t_pair)), 0.0)
        sig_pair = torch.where(paired, torch.sigmoid(t_pair), 0.0)
        sig = sig_pair.clone()
        v_run = torch.zeros_like(qt) if need_u else None
        for c0, c1 in _tiles(m, chunk):
            kc = _unit(k, inv.k, c0, c1, acc)
            s = (qt @ kc.T) * inv_tau
            pos, _ = contrast_masks(masks.tile(a, b, c0, c1), contrast.exclude_self, a, c0)
            t = big_l[:, None] - s
            soft = soft + torch.where(pos, torch.logaddexp(t, torch.zeros_like(t)), 0.0).sum(1)
            w = torch.where(pos, torch.sigmoid(t), 0.0)
            sig = sig + w.sum(1)
            if v_run is not None:
                v_run = v_run + w @ kc
        loss[a:b] = soft * inv_count
        lse_weight[a:b] = sig * inv_count
        pos_coef[a:b] = -sig_pair * inv_count
        if need_u:
            u[a:b] = (o_mean * lse_weight[a:b, None] - v_run * inv_count[:, None])
    return ContrastRows(loss, lse, n_pos, lse_weight, pos_coef, u)


def contrast_bank_grad(q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor,
                       gs_lse: Tensor, gs_pos: Tensor, options: Options, contrast: Contrast) -> Tensor:
    acc = acc_dtype(q)
    chunk = options.chunk_size or DEFAULT_CHUNK
    inv_tau = options.inv_tau
    over_all = contrast.denominator == "all"
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    for a, b in _tiles(q.shape[0], QUERY_TILE):
        qt = _unit(q, inv.q, a, b, acc)
        lse_t, gl, gp = lse[a:b, None], gs_lse[a:b, None], gs_pos[a:b, None]
        for c0, c1 in _tiles(k.shape[0], chunk):
            kc = _unit(k, inv.k, c0, c1, acc)
            s = (qt @ kc.T) * inv_tau
            pos, neg = contrast_masks(masks.tile(a, b, c0, c1), contrast.exclude_self, a, c0)
            in_lse = (pos | neg) if over_all else neg
            # masked before the exponential: outside the set, lse may be -inf
            w = torch.where(in_lse, torch.exp(torch.where(in_lse, s - lse_t, 0.0)) * gl, 0.0)
            sigma = 1.0 if over_all else torch.sigmoid(lse_t - s)
            w = w - torch.where(pos, gp * sigma, 0.0)
            dk[c0:c1] += w.T @ qt
    return dk


# runs anywhere: the default where no faster backend is available (lowest priority)
RECORDS = (Backend("chunked", forward=forward, bank_grad=bank_grad, default_on=None, priority=0,
                   options=("chunk_size",), losses=LOSSES, contrast_forward=contrast_forward,
                   contrast_bank_grad=contrast_bank_grad),)
