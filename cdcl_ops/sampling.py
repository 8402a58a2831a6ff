"""How the cross-patch loss picks each query's negatives: one function per (semantics, sampling)
mode, in the table `MODES` (docs/design.md §1; docs/loss.md for the Table 2 schemes).

A mode turns the batch's rows and patches into the rows of one `masked_infonce` call (`Pairs`),
pushing the batch into the bank first when there is one. Inactive rows are flagged (label or group
< 0), never removed, so every shape depends only on the input shapes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class Bank(Protocol):
    """What a mode asks of the bank (a `FeatureBank`): push the batch, then read every row."""

    def push(self, feats: Tensor, labels: Tensor | None = None, groups: Tensor | None = None) -> Tensor: ...

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]: ...


class Batch(NamedTuple):
    """What every mode reads: the current batch as N = B * H * W rows in (b, h, w) order."""
    q: Tensor          # (N, D) student rows, with their gradient
    p: Tensor          # (N, D) teacher rows at the same pixels: the positives (detached, q's dtype)
    q_lab: Tensor      # (N,) student pseudo labels (< 0: an ignored pixel)
    t_lab: Tensor      # (N,) teacher pseudo labels
    count_s: Tensor    # (B, grid, grid) foreground pixels per student / teacher patch
    count_t: Tensor
    kind_s: Tensor     # (B, grid, grid) patch kinds (patches.FDP / BDP / MP) of the same patches
    kind_t: Tensor
    h: int             # the feature map's size
    w: int
    pixels: int        # pixels per patch
    fdp: float
    bdp: float


class Pairs(NamedTuple):
    """The arguments of `masked_infonce` the mode decides (groups and table None: no groups), and
    which queries are active before the ignored pixels are taken out."""
    q_lab: Tensor
    q_grp: Tensor | None
    k: Tensor
    k_lab: Tensor
    k_grp: Tensor | None
    table: Tensor | None
    active: Tensor


Mode = Callable[[Batch, Bank | None], Pairs]


def per_pixel(patch_values: Tensor, h: int, w: int) -> Tensor:
    """Broadcast (B, grid, grid) patch values to (B * H * W,) pixels in (b, h, w) row-major order."""
    b, g, _ = patch_values.shape
    ph, pw = h // g, w // g
    return patch_values[:, :, None, :, None].expand(b, g, ph, g, pw).reshape(-1)


def official_group_table(pixels: int, fdp: float, bdp: float, device: torch.device | str) -> Tensor:
    """group_table[a, b] of the released code: patch foreground counts a + b <= (bdp + fdp) * pixels."""
    limit = int((bdp + fdp) * pixels + 1e-9)  # counts are integers: compare exactly
    a = torch.arange(pixels + 1, device=device)
    return (a[:, None] + a[None, :]) <= limit


def paper_pixel_patch(x: Batch, bank: Bank | None) -> Pairs:
    """The paper's pixel-patch sampling: FDP queries against the BDB rows, BDP queries against the
    FDB rows (group ids are the patch kinds), negatives where the labels differ."""
    q_grp = per_pixel(x.kind_s, x.h, x.w)
    t_grp = per_pixel(x.kind_t, x.h, x.w)
    # [[0, 1], [1, 0]]: BDP queries see FDB rows, FDP queries BDB rows (made on the device: a
    # tensor from host data would be a synchronous copy)
    table = ~torch.eye(2, dtype=torch.bool, device=x.q.device)
    k, k_lab, k_grp = x.p, x.t_lab, t_grp
    if bank is not None:
        bank.push(x.p, x.t_lab, t_grp)
        k, k_lab, k_grp = bank.tensors()
    return Pairs(x.q_lab, q_grp, k, k_lab, k_grp, table, q_grp >= 0)


def paper_pixel(x: Batch, bank: Bank | None) -> Pairs:
    """Table 2 Scheme 2: every student pixel against one merged bank, negatives where the labels
    differ (no patches)."""
    k, k_lab = x.p, x.t_lab
    if bank is not None:
        bank.push(x.p, x.t_lab)
        k, k_lab, _ = bank.tensors()
    return Pairs(x.q_lab, None, k, k_lab, None, None, x.q_lab >= 0)


def paper_random(x: Batch, bank: Bank | None) -> Pairs:
    """Table 2 Scheme 1: every other bank pixel is a negative (no pseudo labels): each query's only
    non-negative is its own positive, by unique ids."""
    q_grp = torch.where(x.q_lab >= 0, 0, -1)
    t_grp = torch.where(x.t_lab >= 0, 0, -1)
    table = torch.ones(1, 1, dtype=torch.bool, device=x.q.device)
    if bank is None:
        q_lab = torch.arange(x.q.shape[0], device=x.q.device)
        k, k_lab, k_grp = x.p, q_lab, t_grp
    else:
        q_lab = bank.push(x.p, None, t_grp)
        k, k_lab, k_grp = bank.tensors()
    return Pairs(q_lab, q_grp, k, k_lab, k_grp, table, q_grp >= 0)


def official_pixel_patch(x: Batch, bank: Bank | None) -> Pairs:
    """The released code's rule (docs/design.md §2): group ids are patch foreground counts, a pair
    of patches may meet when their counts sum to at most (bdp + fdp) * pixels, and the student rows
    of the batch are bank rows too (with their gradient)."""
    q, q_lab = x.q, x.q_lab
    cs_pix, ct_pix = per_pixel(x.count_s.long(), x.h, x.w), per_pixel(x.count_t.long(), x.h, x.w)
    anchor = per_pixel(x.kind_s, x.h, x.w) >= 0
    q_grp = torch.where(anchor, cs_pix, torch.full_like(cs_pix, -1))
    table = official_group_table(x.pixels, x.fdp, x.bdp, q.device)
    k_lab, k_grp = torch.cat([q_lab, x.t_lab]), torch.cat([cs_pix, ct_pix])
    if bank is None:
        k = torch.cat([q, x.p])
    else:
        rows = bank.push(torch.cat([q.detach(), x.p]), k_lab, k_grp)
        k, k_lab, k_grp = bank.tensors()
        # this rank's student rows of the current batch take part with their gradient
        k = torch.index_copy(k.to(q.dtype), 0, rows[: q.shape[0]], q)
    return Pairs(q_lab, q_grp, k, k_lab, k_grp, table, anchor)


# (semantics, sampling) -> mode; the first entry is the default, and the released code has only
# pixel-patch sampling
MODES: dict[tuple[str, str], Mode] = {
    ("paper", "pixel-patch"): paper_pixel_patch,
    ("paper", "pixel"): paper_pixel,
    ("paper", "random"): paper_random,
    ("official", "pixel-patch"): official_pixel_patch,
}
SEMANTICS: tuple[str, ...] = tuple(dict.fromkeys(s for s, _ in MODES))
SAMPLINGS: tuple[str, ...] = tuple(dict.fromkeys(s for _, s in MODES))
