"""The cross-patch dense contrastive loss of CDCL (docs/design.md §1), as a function and as a module.

Every student pixel is a row of `masked_infonce` (inactive rows are flagged, never removed), so
the shapes depend only on the input shapes: no host synchronisation, and torch.compile traces it.
`compact=True` removes the inactive rows instead (less work, one host synchronisation, eager only).
"""
from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import check_grid
from .bank import FeatureBank
from .infonce import masked_infonce
from .options import CrossPatchOptions
from .patches import BDP, FDP, classify_patches, patch_foreground_scores, signed_labels
from .sampling import MODES, Batch


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


def pseudo_labels(pred: Tensor, b: int, h: int, w: int, name: str) -> Tensor:
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


def _check_options(options: object) -> None:
    if not isinstance(options, CrossPatchOptions):
        raise ValueError(f"options: expected a cdcl_ops.CrossPatchOptions, got {type(options).__name__}")


def _check_bank(bank, d, device):
    if not isinstance(bank, FeatureBank):
        raise ValueError(f"bank: expected None or a cdcl_ops.FeatureBank, got {type(bank).__name__}")
    if bank.dim is not None and bank.dim != d:
        raise ValueError(f"bank: expected feature dim D={d} (as student_feats), got a bank of D={bank.dim}")
    if (bank.capacity is not None or bank._device_fixed) and bank.feats.device != device:
        raise ValueError(f"bank: expected a bank on {device} (as student_feats), got one on "
                         f"{bank.feats.device}")


def cross_patch_infonce(student_feats: Tensor, teacher_feats: Tensor, student_pred: Tensor,
                        teacher_pred: Tensor, bank: FeatureBank | None = None,
                        options: CrossPatchOptions = CrossPatchOptions(), *,
                        return_stats: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Cross-patch dense contrastive loss L_contr of CDCL (docs/design.md §1, paper Eqs. 3-12).

    Args:
        student_feats: (B, D, H, W) projector features of the strongly augmented view (gradients
            flow into them).
        teacher_feats: (B, D, H, W) teacher features of the weakly augmented view, pixel-aligned;
            used as constants (detached).
        student_pred, teacher_pred: logits (B, C, h, w) with h, w integer multiples of H, W
            (softmax average-pooled to (H, W), then argmax), or integer labels (B, H, W).
        bank: a FeatureBank (this batch is pushed into it first), or None: the current batch only.
        options: a CrossPatchOptions (grid, thresholds, temperature, semantics, sampling, backend,
            compact; its `memory` is the module's: here the bank decides).
        return_stats: also return a dict of device tensors: "queries" (active queries),
            "queries_with_negative" (active queries with at least one valid negative),
            "negatives_per_query" (mean over active queries), "fdp_patches", "bdp_patches" (student
            patches), "positive_prob" (mean e^{s+} / denominator).

    Returns:
        The scalar loss (float32; float64 for float64 features), or (loss, stats).
    """
    b, d, h, w = _check_features(student_feats, teacher_feats)
    _check_options(options)
    grid, fdp, bdp = options.grid, options.fdp, options.bdp
    check_grid(grid, h, w, "student_feats")
    if bank is not None:
        _check_bank(bank, d, student_feats.device)
    ys = pseudo_labels(student_pred, b, h, w, "student_pred")
    yt = pseudo_labels(teacher_pred, b, h, w, "teacher_pred")
    if ys.device != student_feats.device or yt.device != student_feats.device:
        raise ValueError(f"student_pred, teacher_pred: expected tensors on {student_feats.device} "
                         f"(as student_feats), got {student_pred.device} and {teacher_pred.device}")
    pixels = (h // grid) * (w // grid)
    _, count_s = patch_foreground_scores(ys, grid, options.fg_class)
    _, count_t = patch_foreground_scores(yt, grid, options.fg_class)
    kind_s = classify_patches(count_s.double() / pixels, fdp, bdp)
    kind_t = classify_patches(count_t.double() / pixels, fdp, bdp)

    q = student_feats.permute(0, 2, 3, 1).reshape(-1, d)
    p = teacher_feats.detach().permute(0, 2, 3, 1).reshape(-1, d).to(q.dtype)
    # labels < 0: inactive rows (the mask encoding of masked_infonce)
    batch = Batch(q, p, ys.reshape(-1).long(), yt.reshape(-1).long(), count_s, count_t, kind_s, kind_t,
                  h, w, pixels, fdp, bdp)
    q_lab, q_grp, k, k_lab, k_grp, table, active = MODES[options.semantics, options.sampling](batch, bank)
    # a pixel whose pseudo label is < 0 (an "ignore" label passed in) is never a query
    active = active & (ys.reshape(-1) >= 0)

    k = k.to(q.dtype)
    temperature, backend = options.temperature, options.backend
    if options.compact:
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
    """`cross_patch_infonce` owning its FeatureBank (sized on the first call, saved in state_dict):
    `options.memory` previous batches are kept besides the current one (the paper: 1)."""

    def __init__(self, options: CrossPatchOptions = CrossPatchOptions()) -> None:
        super().__init__()
        _check_options(options)
        self.options = options
        self.bank = FeatureBank(dim=None, capacity=None, memory=options.memory)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor, student_pred: Tensor,
                teacher_pred: Tensor, return_stats: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        return cross_patch_infonce(student_feats, teacher_feats, student_pred, teacher_pred, self.bank,
                                   self.options, return_stats=return_stats)

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in fields(self.options))
