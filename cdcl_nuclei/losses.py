"""The training objectives: which loss terms each method switches on, the terms themselves, and the
one place the contrastive loss module is built from the run settings (docs/training.md, Methods)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdcl_ops import CrossPatchInfoNCE, CrossPatchOptions
from cdcl_ops.sampling import SAMPLINGS, SEMANTICS


@dataclass(frozen=True)
class Method:
    """What a method trains on, and which unlabeled terms it switches on unless told otherwise."""
    semi: bool  # an unlabeled branch (teacher, L_cons / L_contr / L_ent) beside the labeled one
    all_labeled: bool  # every training image labeled: --labeled-fraction does not apply
    cons: bool
    contr: bool
    ent: bool


METHODS = {
    "suponly": Method(semi=False, all_labeled=False, cons=False, contr=False, ent=False),
    "fullsup": Method(semi=False, all_labeled=True, cons=False, contr=False, ent=False),
    # the paper's Scheme 6: CDCL without L_contr, so CDCL - MeanTeacher isolates the contrastive term
    "meanteacher": Method(semi=True, all_labeled=False, cons=True, contr=False, ent=True),
    "cdcl": Method(semi=True, all_labeled=False, cons=True, contr=True, ent=True),
}

# the options of the cross-patch loss that a run sets, with the library's own defaults and choices,
# so that the method's defaults are written once, in cdcl_ops (CrossPatchOptions)
CONTRAST_OPTIONS = ("grid", "fdp", "bdp", "temperature", "memory", "semantics", "sampling")
CONTRAST_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CrossPatchOptions) if f.name in CONTRAST_OPTIONS}
CONTRAST_CHOICES = {"semantics": SEMANTICS, "sampling": SAMPLINGS}


def contrastive_loss(cfg) -> CrossPatchInfoNCE:
    """L_contr's module (with its feature bank) for the run settings `cfg` (a TrainConfig)."""
    return CrossPatchInfoNCE(CrossPatchOptions(**{k: getattr(cfg, k) for k in CONTRAST_OPTIONS},
                                               backend=cfg.loss_backend, compact=cfg.loss_compact))


def entropy(logits):
    """L_ent: the mean pixel entropy of the predicted class distribution."""
    p = logits.float().softmax(dim=1)
    return -(p * torch.log(p.clamp_min(1e-8))).sum(dim=1).mean()


def soft_dice_loss(logits, target):
    """1 - soft Dice of the foreground probability against the binary target, over the batch."""
    p = 1.0 - logits.float().softmax(dim=1)[:, 0]
    t = (target > 0).float()
    return 1.0 - (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)


def consistency(student_logits, teacher_logits, threshold: float = 0.0, target: str = "hard"):
    """(L_cons, the pixels it kept): the student's prediction on the strong view against the teacher's
    on the weak view.

    target "hard": cross-entropy against the teacher's argmax (the paper); "soft": squared error between
    the two softmax outputs, summed over classes (the original mean teacher). threshold > 0 keeps the
    pixels whose teacher confidence (largest class probability) reaches it, and the loss stays a mean
    over all pixels, so a teacher that trusts nothing contributes nothing (FixMatch's normalisation).
    """
    t_prob = teacher_logits.float().softmax(dim=1)
    conf, pseudo = t_prob.max(dim=1)
    mask = conf >= threshold if threshold > 0 else torch.ones_like(conf, dtype=torch.bool)
    if target == "hard" and threshold <= 0:
        # the paper's recipe, computed exactly as before the threshold existed
        return F.cross_entropy(student_logits.float(), pseudo), mask
    if target == "hard":
        per_pixel = F.cross_entropy(student_logits.float(), pseudo, reduction="none")
    elif target == "soft":
        per_pixel = (student_logits.float().softmax(dim=1) - t_prob).pow(2).sum(dim=1)
    else:
        raise ValueError(f"target: expected 'hard' or 'soft', got {target!r}")
    return (per_pixel * mask).mean(), mask


def contrast_shares(stats, feats, grid):
    """What the contrastive loss saw in one step: the share of student patches that are FDP and BDP,
    the share of pixels that are queries with at least one negative, negatives per query."""
    b, _, h, w = feats.shape
    patches, pixels = b * grid * grid, b * h * w
    return {"fdp_share": stats["fdp_patches"] / patches, "bdp_share": stats["bdp_patches"] / patches,
            "query_share": stats["queries"] / pixels,
            "with_negative_share": stats["queries_with_negative"] / pixels,
            "negatives_per_query": stats["negatives_per_query"]}
