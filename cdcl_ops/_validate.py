"""Input checks and the canonical mask encoding shared by every backend.

Every backend sees the same five tensors describing the mask J of docs/design.md §2:

    q_lab (N,) int32, q_grp (N,) int32  -- q_grp < 0 marks an inactive query
    k_lab (M,) int32, k_grp (M,) int32  -- k_grp < 0 marks an unusable bank row
    table (G, G) bool

so that "no groups" is just the 1 x 1 table [[True]] and one mask formula serves all of them. They
travel together as a `backends.interface.Masks` bundle; only the torch.library schemas take them
one by one.
Nothing is narrowed to int32 by a cast that could change a value: labels that may not fit (int64,
uint32) are renumbered, equal values to equal ids, and group ids are clamped to [-1, G] first.
"""
from __future__ import annotations

import math
import numbers
from typing import NoReturn

import numpy as np
import torch
from torch import Tensor

from .backends.interface import DENOMINATORS, Masks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# uint16 / uint32: label images (instance maps) are stored so; uint64 has values int64 cannot hold
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32)
INT_NAMES = "/".join(str(t).removeprefix("torch.") for t in INT_DTYPES)
NARROW_SAFE = (torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16)  # fit int32 as they are
REDUCTIONS = ("mean", "sum", "none")
# Scores are cos / tau in fp32: below this the fp32 rounding of the scores (~6e-8 / tau, absolute)
# makes near-tied softmax weights inaccurate beyond use (docs/loss.md, "Accuracy")
MIN_TEMPERATURE = 1e-4


def _fail(name: str, expected: str, got: object) -> NoReturn:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_features(name, t, n=None, d=None, device=None, dtype=None):
    if not isinstance(t, torch.Tensor):
        _fail(name, "a torch.Tensor", type(t).__name__)
    if t.dim() != 2:
        _fail(name, "a 2-D tensor (rows, D)", f"shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        _fail(name, "a float16/bfloat16/float32/float64 tensor", t.dtype)
    if n is not None and t.shape[0] != n:
        _fail(name, f"{n} rows", f"shape {tuple(t.shape)}")
    if d is not None and t.shape[1] != d:
        _fail(name, f"feature dim D={d} (as query)", f"shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        _fail(name, f"a tensor on {device} (as query)", t.device)
    if dtype is not None and t.dtype != dtype:
        _fail(name, f"dtype {dtype} (as query)", t.dtype)


def _check_ids(name, t, n, device):
    if not isinstance(t, torch.Tensor):
        _fail(name, "a torch.Tensor", type(t).__name__)
    if t.dtype not in INT_DTYPES:
        _fail(name, f"an integer tensor ({INT_NAMES})", t.dtype)
    if t.dim() != 1 or t.shape[0] != n:
        _fail(name, f"a 1-D tensor of length {n}", f"shape {tuple(t.shape)}")
    if t.device != device:
        _fail(name, f"a tensor on {device} (as query)", t.device)


def check_arguments(query: Tensor, positive: Tensor, bank: Tensor, query_labels: Tensor,
                    bank_labels: Tensor, query_groups: Tensor | None, bank_groups: Tensor | None,
                    group_table: Tensor | None, reduction: str) -> None:
    """Shape/dtype/device checks that need no data from the device (safe under torch.compile)."""
    _check_features("query", query)
    n, d = query.shape
    if d < 1:
        _fail("query", "a feature dim D >= 1", f"shape {tuple(query.shape)}")
    _check_features("positive", positive, n=n, d=d, device=query.device, dtype=query.dtype)
    _check_features("bank", bank, d=d, device=query.device, dtype=query.dtype)
    m = bank.shape[0]
    _check_ids("query_labels", query_labels, n, query.device)
    _check_ids("bank_labels", bank_labels, m, query.device)
    _check_groups(query, query_groups, bank_groups, group_table, m)
    if reduction not in REDUCTIONS:
        _fail("reduction", f"one of {REDUCTIONS}", repr(reduction))


def _check_table(group_table, device):
    if not isinstance(group_table, torch.Tensor):
        _fail("group_table", "a torch.Tensor", type(group_table).__name__)
    if group_table.dim() != 2 or group_table.shape[0] != group_table.shape[1] \
            or group_table.shape[0] == 0:
        _fail("group_table", "a non-empty square (G, G) tensor", f"shape {tuple(group_table.shape)}")
    if group_table.dtype != torch.bool and group_table.dtype not in INT_DTYPES:
        _fail("group_table", "a bool or integer tensor", group_table.dtype)
    if group_table.device != device:
        _fail("group_table", f"a tensor on {device} (as query)", group_table.device)


def _check_groups(query, query_groups, bank_groups, group_table, m):
    """Groups of a loss with a bank of m rows: all three or none."""
    given = [x is not None for x in (query_groups, bank_groups, group_table)]
    if any(given) and not all(given):
        raise ValueError("query_groups, bank_groups, group_table: expected all three or none, got "
                         f"query_groups={'set' if given[0] else None}, "
                         f"bank_groups={'set' if given[1] else None}, "
                         f"group_table={'set' if given[2] else None}")
    if all(given):
        _check_ids("query_groups", query_groups, query.shape[0], query.device)
        _check_ids("bank_groups", bank_groups, m, query.device)
        _check_table(group_table, query.device)


def check_contrast_arguments(query: Tensor, query_labels: Tensor, bank: Tensor | None,
                             bank_labels: Tensor | None, positive: Tensor | None,
                             query_groups: Tensor | None, bank_groups: Tensor | None,
                             group_table: Tensor | None, denominator: str, reduction: str) -> None:
    """The checks of `supervised_contrast` that need no data from the device. bank=None: the
    queries are their own bank, so bank_labels and bank_groups must be None too."""
    _check_features("query", query)
    n, d = query.shape
    if d < 1:
        _fail("query", "a feature dim D >= 1", f"shape {tuple(query.shape)}")
    _check_ids("query_labels", query_labels, n, query.device)
    if positive is not None:
        _check_features("positive", positive, n=n, d=d, device=query.device, dtype=query.dtype)
    if bank is None:
        for name, t in (("bank_labels", bank_labels), ("bank_groups", bank_groups)):
            if t is not None:
                _fail(name, "None with bank=None (the queries are the bank: their labels and "
                      "groups serve it)", "a value")
        if (query_groups is None) != (group_table is None):
            raise ValueError("query_groups, group_table: expected both or none with bank=None, got "
                             f"query_groups={'set' if query_groups is not None else None}, "
                             f"group_table={'set' if group_table is not None else None}")
        if query_groups is not None:
            _check_ids("query_groups", query_groups, n, query.device)
            _check_table(group_table, query.device)
    else:
        _check_features("bank", bank, d=d, device=query.device, dtype=query.dtype)
        if bank_labels is None:
            _fail("bank_labels", "a tensor of the bank's labels (it is None only with bank=None)", None)
        _check_ids("bank_labels", bank_labels, bank.shape[0], query.device)
        _check_groups(query, query_groups, bank_groups, group_table, bank.shape[0])
    if denominator not in DENOMINATORS:
        _fail("denominator", f"one of {DENOMINATORS}", repr(denominator))
    if reduction not in REDUCTIONS:
        _fail("reduction", f"one of {REDUCTIONS}", repr(reduction))


def check_temperature(temperature: object) -> float:
    """tau as a float: a finite number >= MIN_TEMPERATURE, the one rule of every entry point.

    Python numbers, numpy scalars and 0-d real tensors are numbers here; bool (Python's, numpy's
    or a bool tensor) is refused, since True would quietly mean tau = 1.
    """
    value = None
    if isinstance(temperature, (bool, np.bool_)):
        pass
    elif isinstance(temperature, (int, float)):
        value = float(temperature)  # the common case early: torch.compile traces it as a constant
    elif isinstance(temperature, torch.Tensor):
        if temperature.dim() == 0 and not temperature.is_complex() and temperature.dtype != torch.bool:
            value = float(temperature)
    elif isinstance(temperature, numbers.Real):
        value = float(temperature)  # numpy's integer and floating scalars
    if value is None or not math.isfinite(value) or not value >= MIN_TEMPERATURE:
        _fail("temperature", f"a finite number >= {MIN_TEMPERATURE} (MIN_TEMPERATURE)", repr(temperature))
    return value


def check_grid(grid: object, h: int | None = None, w: int | None = None,
               what: str = "labels_or_logits") -> None:
    """grid: patches per side, an int >= 1; with (h, w) given, a divisor of both (equal patches)."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid: expected an int >= 1, got {grid!r}")
    if h is not None and w is not None and (h % grid or w % grid):
        raise ValueError(f"grid: expected a divisor of both H={h} and W={w} of {what} "
                         f"(equal patches), got {grid}")


def check_thresholds(fdp: float, bdp: float) -> None:
    """fdp, bdp: numbers in [0, 1] with bdp < fdp (the patch kinds' thresholds)."""
    for name, v in (("fdp", fdp), ("bdp", bdp)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
    if not bdp < fdp:
        raise ValueError(f"bdp, fdp: expected bdp < fdp (background- below foreground-dominated "
                         f"threshold), got bdp={bdp}, fdp={fdp}")


def check_values(query: Tensor, positive: Tensor | None, bank: Tensor | None,
                 query_groups: Tensor | None, bank_groups: Tensor | None, group_table: Tensor | None,
                 check_finite: bool) -> None:
    """Checks that read device data: one host synchronisation for all of them together. A None
    feature or group tensor (the supervised loss's optional positive, its bank=None) is skipped."""
    flags = []
    if group_table is not None:
        g = group_table.shape[0]
        for name, groups in (("query_groups", query_groups), ("bank_groups", bank_groups)):
            if groups is not None:
                flags.append((name, f"ids < G={g} (the group_table size)", (groups.long() >= g).any()))
    if check_finite:
        for name, t in (("query", query), ("positive", positive), ("bank", bank)):
            if t is not None:
                flags.append((name, "finite values", ~torch.isfinite(t).all()))
    if not flags:
        return
    bad = torch.stack([f[2] for f in flags]).cpu()
    for (name, expected, _), b in zip(flags, bad.tolist()):
        if b:
            _fail(name, expected, "values outside that")


def _renumber(query_labels, bank_labels):
    """int32 ids of int64 / uint32 labels: equal values get equal ids (a dense rank over query and
    bank labels together), negative ones -1. Shapes stay static: no host synchronisation."""
    both = torch.cat([query_labels.long(), bank_labels.long()])
    values, order = torch.sort(both)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[1:] = values[1:] != values[:-1]
    ids = torch.empty_like(values).scatter_(0, order, torch.cumsum(starts, 0) - 1)
    ids = torch.where(both < 0, -1, ids).to(torch.int32)
    return ids[: query_labels.shape[0]], ids[query_labels.shape[0]:]


def _labels_int32(query_labels, bank_labels):
    if query_labels.dtype in NARROW_SAFE and bank_labels.dtype in NARROW_SAFE:
        return query_labels.to(torch.int32), bank_labels.to(torch.int32)
    if query_labels.shape[0] + bank_labels.shape[0] > 2**31:
        raise ValueError(f"query_labels, bank_labels: expected at most 2**31 rows in all to renumber "
                         f"{query_labels.dtype} / {bank_labels.dtype} labels, got "
                         f"{query_labels.shape[0]} + {bank_labels.shape[0]}")
    return _renumber(query_labels, bank_labels)


def _groups_int32(groups, g):
    """Ids < 0 stay inactive (-1) and ids >= G, possible only with the checks off, become inactive
    too: no cast can turn an out-of-range id into a valid one."""
    groups = groups.long()
    return torch.where((groups < 0) | (groups >= g), -1, groups).to(torch.int32)


def canonical_masks(query_labels: Tensor, bank_labels: Tensor, query_groups: Tensor | None,
                    bank_groups: Tensor | None, group_table: Tensor | None) -> Masks:
    """The masks of the user's labels, groups and table, in the encoding of the module doc."""
    ql, kl = _labels_int32(query_labels, bank_labels)
    if group_table is None:
        qg = torch.zeros_like(ql)
        kg = torch.zeros_like(kl)
        table = torch.ones(1, 1, dtype=torch.bool, device=ql.device)
    else:
        g = group_table.shape[0]
        qg = _groups_int32(query_groups, g)
        kg = _groups_int32(bank_groups, g)
        table = group_table.to(torch.bool)
    minus_one = torch.full((), -1, dtype=torch.int32, device=ql.device)
    qg = torch.where(ql < 0, minus_one, qg).contiguous()
    kg = torch.where(kl < 0, minus_one, kg).contiguous()
    return Masks(ql.contiguous(), qg, kl.contiguous(), kg, table.contiguous())


def candidate_mask(masks: Masks) -> Tensor:
    """The dense mask (rows x cols) of pairs the groups allow between active rows, labels aside."""
    q_lab, q_grp, k_lab, k_grp, table = masks
    ok = (q_grp[:, None] >= 0) & (k_grp[None, :] >= 0)
    return ok & table[q_grp.clamp(min=0)][:, k_grp.clamp(min=0)]


def negative_mask(masks: Masks) -> Tensor:
    """The dense mask J (rows x cols) for the PyTorch backends."""
    return candidate_mask(masks) & (masks.q_lab[:, None] != masks.k_lab[None, :])


def contrast_masks(masks: Masks, exclude_self: bool = False, q0: int = 0, k0: int = 0
                   ) -> tuple[Tensor, Tensor]:
    """The dense (positives, negatives) masks of the supervised loss (docs/design.md §7) for the
    PyTorch backends: candidates with the query's label, and with another. `masks` may be a tile
    whose first query is row q0 and first bank row k0; with exclude_self (the queries are the
    bank) bank row i is no candidate of query i."""
    cand = candidate_mask(masks)
    if exclude_self:
        rows = torch.arange(q0, q0 + cand.shape[0], device=cand.device)
        cols = torch.arange(k0, k0 + cand.shape[1], device=cand.device)
        cand = cand & (rows[:, None] != cols[None, :])
    same = masks.q_lab[:, None] == masks.k_lab[None, :]
    return cand & same, cand & ~same
