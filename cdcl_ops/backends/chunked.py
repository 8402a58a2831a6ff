"""Pure-PyTorch streaming backend: tiles of queries x bank chunks, online log-sum-exp.

Peak memory is a few (query tile x bank chunk) buffers; only LSE (N) and O (N, D) are kept for
backward, as in docs/design.md §3. Works on any device and dtype (fp64 included, used by gradcheck).
"""
import torch

from .._validate import negative_mask
from ..normalize import acc_dtype

QUERY_TILE = 4096
DEFAULT_CHUNK = 2048


def _tiles(n, size):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _unit(x, inv, a, b, acc):
    return x[a:b].to(acc) * inv[a:b, None]


def forward(q, p, k, inv, masks, options, need_o):
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
            if need_o:
                o_run = o_run * alpha[:, None] + e @ kc
            m_run = m_new
        log_l = torch.log(l_run)
        loss[a:b] = (m_run - s_pos) + log_l
        lse[a:b] = m_run + log_l
        if need_o:
            o[a:b] = o_run / l_run[:, None]
    return loss, lse, o


def bank_grad(q, k, inv, masks, lse, gs, options):
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
