"""Pure-PyTorch streaming backend: tiles of queries x bank chunks, online log-sum-exp.

Peak memory is a few (query tile x bank chunk) buffers; only LSE (N) and O (N, D) are kept for
backward, as in docs/design.md §3. Works on any device and dtype (fp64 included, used by gradcheck).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import negative_mask
from ..normalize import acc_dtype
from .interface import InverseNorms, Masks, Options
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


# runs anywhere: the default where no faster backend is available (lowest priority)
RECORDS = (Backend("chunked", forward=forward, bank_grad=bank_grad, default_on=None, priority=0,
                   options=("chunk_size",)),)
