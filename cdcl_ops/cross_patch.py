"""The cross-patch dense contrastive loss of CDCL (docs/design.md §1), as a function and as a module.

Every student pixel is a row of `masked_infonce` (inactive rows are flagged, never removed), so
the shapes depend only on the input shapes: no host synchronisation, and torch.compile traces it.
`compact=True` removes the inactive rows instead (less work, one host synchronisation, eager only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_grid, check_temperature
from .bank import FeatureBank
from .infonce import masked_infonce
from .patches import (
    BDP,
    FDP,
    check_thresholds,
    classify_patches,
    patch_foreground_scores,
    per_pixel,
    signed_labels,
)

SEMANTICS = ("paper", "official")
SAMPLINGS = ("pixel-patch", "pixel", "random")


def _check_features(student_feats, teacher_feats):
    for name, t in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"{t.dtype} shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected floating features (B, D, H, W), got {got}")
    if teacher_feats.shape != student_feats.shape:
        raise ValueError(f"teacher_feats: expected shape {tuple(student_feats.shape)} (as student_feats),"
                         f" got {tuple(teacher_feats.shape)}")
    if teacher_feats.device != student_feats.device:
        raise ValueError(f"teacher_feats: expected a tensor on {student_feats.device} (as "
                         f"student_feats), got {teacher_feats.device}")
    return student_feats.shape


def pseudo_labels(pred, b, h, w, name):
    """(B, H, W) labels from logits (B, C, kh*H, kw*W) or from integer labels (B, H, W).

    Larger logits are brought to (H, W) by average-pooling the softmax, then argmax (docs/design.md §1).
    """
    if not isinstance(pred, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(pred).__name__}")
    if pred.is_floating_point():
        if pred.dim() != 4 or pred.shape[0] != b or pred.shape[1] < 1:
            raise ValueError(f"{name}: expected logits (B={b}, C, h, w), got shape {tuple(pred.shape)}")
        ph, pw = pred.shape[-2:]
        if ph < h or pw < w or ph % h or pw % w:
            raise ValueError(f"{name}: expected a spatial size that is an integer multiple of the "
                             f"features' (H, W) = ({h}, {w}), got shape {tuple(pred.shape)}")
        pred = pred.detach()
        if (ph, pw) == (h, w):
            return pred.argmax(dim=1)
        probs = F.avg_pool2d(pred.float().softmax(dim=1), kernel_size=(ph // h, pw // w))
        return probs.argmax(dim=1)
    if pred.is_floating_point() or pred.is_complex() or tuple(pred.shape) != (b, h, w):
        raise ValueError(f"{name}: expected floating logits (B, C, h, w) or integer labels of the "
                         f"features' size (B, H, W) = ({b}, {h}, {w}), got a {pred.dtype} tensor of "
                         f"shape {tuple(pred.shape)}")
    return signed_labels(pred, name)


def _check_options(grid, fdp, bdp, temperature, semantics, sampling, fg_class):
    check_thresholds(fdp, bdp)
    check_temperature(temperature)
    check_grid(grid)
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics: expected one of {SEMANTICS}, got {semantics!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {sampling!r}")
    if semantics == "official" and sampling != "pixel-patch":
        raise ValueError(f"sampling: semantics='official' has only 'pixel-patch' sampling, got {sampling!r}")
    if isinstance(fg_class, bool) or not isinstance(fg_class, int):
        raise ValueError(f"fg_class: expected an int, got {fg_class!r}")


def _check_bank(bank, d, device):
    if not isinstance(bank, FeatureBank):
        raise ValueError(f"bank: expected None or a cdcl_ops.FeatureBank, got {type(bank).__name__}")
    if bank.dim is not None and bank.dim != d:
        raise ValueError(f"bank: expected feature dim D={d} (as student_feats), got a bank of D={bank.dim}")
    if (bank.capacity is not None or bank._device_fixed) and bank.feats.device != device:
        raise ValueError(f"bank: expected a bank on {device} (as student_feats), got one on "
                         f"{bank.feats.device}")


def official_group_table(pixels, fdp, bdp, device):
    """group_table[a, b] of the released code: patch foreground counts a + b <= (bdp + fdp) * pixels."""
    limit = int((bdp + fdp) * pixels + 1e-9)  # counts are integers: compare exactly
    a = torch.arange(pixels + 1, device=device)
    return (a[:, None] + a[None, :]) <= limit


def cross_patch_infonce(student_feats, teacher_feats, student_pred, teacher_pred, bank=None, grid=8,
                        fdp=0.7, bdp=0.3, temperature=0.1, fg_class=1, semantics="paper",
                        sampling="pixel-patch", backend=None, return_stats=False, compact=False):
    """Cross-patch dense contrastive loss L_contr of CDCL (docs/design.md §1, paper Eqs. 3-12).

    Args:
        student_feats: (B, D, H, W) projector features of the strongly augmented view (gradients
            flow into them).
        teacher_feats: (B, D, H, W) teacher features of the weakly augmented view, pixel-aligned;
            used as constants (detached).
        student_pred, teacher_pred: logits (B, C, h, w) with h, w integer multiples of H, W
            (softmax average-pooled to (H, W), then argmax), or integer labels (B, H, W).
        bank: a FeatureBank (this batch is pushed into it first), or None: the current batch only.
        grid: patches per side (must divide H and W). fdp, bdp: FDP / BDP thresholds on the
            foreground score. temperature: tau. fg_class: the foreground label.
        semantics: "paper" (docs/design.md §1) or "official" (the released code's rule, docs/design.md §2).
        sampling: "pixel-patch" (the paper's), "pixel" (Table 2 Scheme 2: every student pixel
            against one merged bank, negatives = different pseudo label) or "random" (Scheme 1:
            every other bank pixel is a negative, no pseudo labels).
        backend: masked_infonce backend (None: the fastest for the device).
        return_stats: also return a dict of device tensors: "queries" (active queries),
            "queries_with_negative" (active queries with at least one valid negative),
            "negatives_per_query" (mean over active queries), "fdp_patches", "bdp_patches" (student
            patches), "positive_prob" (mean e^{s+} / denominator).
        compact: gather the active queries and bank rows before the op. Same result with less
            work when many pixels are MP or the bank has empty slots, at the price of one host
            synchronisation and data-dependent shapes (eager mode only: not under torch.compile).

    Returns:
        The scalar loss (float32; float64 for float64 features), or (loss, stats).
    """
    b, d, h, w = _check_features(student_feats, teacher_feats)
    _check_options(grid, fdp, bdp, temperature, semantics, sampling, fg_class)
    check_grid(grid, h, w, "student_feats")
    if bank is not None:
        _check_bank(bank, d, student_feats.device)
    ys = pseudo_labels(student_pred, b, h, w, "student_pred")
    yt = pseudo_labels(teacher_pred, b, h, w, "teacher_pred")
    if ys.device != student_feats.device or yt.device != student_feats.device:
        raise ValueError(f"student_pred, teacher_pred: expected tensors on {student_feats.device} "
                         f"(as student_feats), got {student_pred.device} and {teacher_pred.device}")
    pixels = (h // grid) * (w // grid)
    _, count_s = patch_foreground_scores(ys, grid, fg_class)
    _, count_t = patch_foreground_scores(yt, grid, fg_class)
    kind_s = classify_patches(count_s.double() / pixels, fdp, bdp)
    kind_t = classify_patches(count_t.double() / pixels, fdp, bdp)

    q = student_feats.permute(0, 2, 3, 1).reshape(-1, d)
    p = teacher_feats.detach().permute(0, 2, 3, 1).reshape(-1, d).to(q.dtype)
    q_lab = ys.reshape(-1).long()
    t_lab = yt.reshape(-1).long()  # labels < 0: inactive rows (the mask encoding of masked_infonce)
    q_grp = k_grp = table = None

    if semantics == "official":
        cs_pix, ct_pix = per_pixel(count_s.long(), h, w), per_pixel(count_t.long(), h, w)
        anchor = per_pixel(kind_s, h, w) >= 0
        q_grp = torch.where(anchor, cs_pix, torch.full_like(cs_pix, -1))
        table = official_group_table(pixels, fdp, bdp, q.device)
        k_lab, k_grp = torch.cat([q_lab, t_lab]), torch.cat([cs_pix, ct_pix])
        if bank is None:
            k = torch.cat([q, p])
        else:
            rows = bank.push(torch.cat([q.detach(), p]), k_lab, k_grp)
            k, k_lab, k_grp = bank.tensors()
            # this rank's student rows of the current batch take part with their gradient
            k = torch.index_copy(k.to(q.dtype), 0, rows[: q.shape[0]], q)
        active = anchor
    elif sampling == "pixel-patch":
        q_grp = per_pixel(kind_s, h, w)
        t_grp = per_pixel(kind_t, h, w)
        # [[0, 1], [1, 0]]: BDP queries see FDB rows, FDP queries BDB rows (made on the device:
        # a tensor from host data would be a synchronous copy)
        table = ~torch.eye(2, dtype=torch.bool, device=q.device)
        k, k_lab, k_grp = p, t_lab, t_grp
        if bank is not None:
            bank.push(p, t_lab, t_grp)
            k, k_lab, k_grp = bank.tensors()
        active = q_grp >= 0
    elif sampling == "pixel":
        k, k_lab = p, t_lab
        if bank is not None:
            bank.push(p, t_lab)
            k, k_lab, _ = bank.tensors()
        active = q_lab >= 0
    else:  # random: each query's only non-negative is its own positive (unique ids)
        q_grp = torch.where(q_lab >= 0, 0, -1)
        t_grp = torch.where(t_lab >= 0, 0, -1)
        table = torch.ones(1, 1, dtype=torch.bool, device=q.device)
        if bank is None:
            q_lab = torch.arange(q.shape[0], device=q.device)
            k, k_lab, k_grp = p, q_lab, t_grp
        else:
            q_lab = bank.push(p, None, t_grp)
            k, k_lab, k_grp = bank.tensors()
        active = q_grp >= 0
    # a pixel whose pseudo label is < 0 (an "ignore" label passed in) is never a query
    active = active & (ys.reshape(-1) >= 0)

    k = k.to(q.dtype)
    if compact:
        per = _compacted(q, p, k, q_lab, k_lab, q_grp, k_grp, table, active, temperature, backend)
    else:
        per = masked_infonce(q, p, k, q_lab, k_lab, q_grp, k_grp, table, temperature=temperature,
                             reduction="none", backend=backend, check_inputs=False)
    n_active = active.sum()
    denom = n_active.clamp(min=1).to(per.dtype)
    loss = per.sum() / denom
    if not return_stats:
        return loss
    with torch.no_grad():
        # negatives per query from the same masks: with all-equal unit features every logit is 1,
        # so a row's loss is log(1 + its number of negatives)
        ones_q = torch.ones(q.shape[0], 1, dtype=torch.float32, device=q.device)
        ones_k = torch.ones(k.shape[0], 1, dtype=torch.float32, device=q.device)
        count = masked_infonce(ones_q, ones_q, ones_k, torch.where(active, q_lab, -1), k_lab, q_grp,
                               k_grp, table, temperature=1.0, reduction="none", backend=backend,
                               check_inputs=False)
        negatives = torch.expm1(count.double()).round()
        stats = {"queries": n_active,
                 "queries_with_negative": (active & (negatives > 0)).sum(),
                 "negatives_per_query": (negatives * active).sum() / denom,
                 "fdp_patches": (kind_s == FDP).sum(),
                 "bdp_patches": (kind_s == BDP).sum(),
                 "positive_prob": (torch.exp(-per) * active).sum() / denom}
    return loss, stats


SPLIT_MAX_GROUPS = 8  # with few groups, one call per query group skips the bank rows it may not see


def _compacted(q, p, k, q_lab, k_lab, q_grp, k_grp, table, active, temperature, backend):
    """Per-query losses (N,) computed on the active queries and usable bank rows only.

    With a small group table (paper mode: FDP / BDP) each query group gets its own call against
    only the bank rows its table row allows, so no masked-out pair is computed at all.
    """
    if torch.compiler.is_compiling():
        raise ValueError("compact: expected False under torch.compile (compaction has "
                         "data-dependent shapes)")
    usable = k_lab >= 0 if k_grp is None else (k_lab >= 0) & (k_grp >= 0)
    if table is not None and table.shape[0] <= SPLIT_MAX_GROUPS:
        allowed = table.to(torch.bool)[:, k_grp.clamp(min=0)] & usable           # (G, M)
        parts = [((active & (q_grp == g)).nonzero().squeeze(1), allowed[g].nonzero().squeeze(1))
                 for g in range(table.shape[0])]
    else:
        parts = [(active.nonzero().squeeze(1), usable.nonzero().squeeze(1))]
    pick = lambda t, i: None if t is None else t.index_select(0, i)  # noqa: E731
    losses = [masked_infonce(pick(q, qi), pick(p, qi), pick(k, ki), pick(q_lab, qi), pick(k_lab, ki),
                             pick(q_grp, qi), pick(k_grp, ki), table, temperature=temperature,
                             reduction="none", backend=backend, check_inputs=False)
              for qi, ki in parts]
    rows = torch.cat([qi for qi, _ in parts])
    return losses[0].new_zeros(q.shape[0]).index_copy(0, rows, torch.cat(losses))


class CrossPatchInfoNCE(torch.nn.Module):
    """`cross_patch_infonce` owning its FeatureBank (sized on the first call, saved in state_dict).

    `memory` previous batches are kept besides the current one (the paper: 1). The other options
    are those of `cross_patch_infonce`.
    """

    def __init__(self, grid=8, fdp=0.7, bdp=0.3, temperature=0.1, fg_class=1, memory=1,
                 semantics="paper", sampling="pixel-patch", backend=None, compact=False):
        super().__init__()
        _check_options(grid, fdp, bdp, temperature, semantics, sampling, fg_class)
        self.grid, self.fdp, self.bdp = grid, fdp, bdp
        self.temperature, self.fg_class = temperature, fg_class
        self.semantics, self.sampling, self.backend = semantics, sampling, backend
        self.compact = bool(compact)
        self.bank = FeatureBank(dim=None, capacity=None, memory=memory)

    def forward(self, student_feats, teacher_feats, student_pred, teacher_pred, return_stats=False):
        return cross_patch_infonce(student_feats, teacher_feats, student_pred, teacher_pred,
                                   bank=self.bank, grid=self.grid, fdp=self.fdp, bdp=self.bdp,
                                   temperature=self.temperature, fg_class=self.fg_class,
                                   semantics=self.semantics, sampling=self.sampling,
                                   backend=self.backend, return_stats=return_stats,
                                   compact=self.compact)

    def extra_repr(self):
        return (f"grid={self.grid}, fdp={self.fdp}, bdp={self.bdp}, temperature={self.temperature}, "
                f"fg_class={self.fg_class}, memory={self.bank.memory}, semantics={self.semantics!r}, "
                f"sampling={self.sampling!r}, backend={self.backend!r}, compact={self.compact}")
