"""What the unlabeled branch learns from: the teacher's pseudo labels measured against the labels the
benchmark protocol hides.

The benchmark split knows the labels of its "unlabeled" training images; a run never trains on them,
but measuring the teacher's argmax against them (overall, on the pixels it is confident about, per
kind of image) tells whether the consistency target is worth imitating. The user's own unlabeled
images have no labels to hide: their log holds the share of confident pixels only.
"""
from __future__ import annotations

import numpy as np
import torch

KINDS = ("fluorescence", "brightfield", "stained")


def image_kind(image: np.ndarray) -> str:
    """Fluorescence (dark background), brightfield (light grey background) or stained tissue (coloured),
    from a uint8 (H, W, 3) image. The background is the median pixel, since nuclei cover less than half
    of almost every image; the stain shows as the spread between the colour channels."""
    x = image.astype(np.float32) / 255.0
    colour = float(np.median(x.max(axis=2) - x.min(axis=2)))
    if colour > 0.08:
        return "stained"
    return "fluorescence" if float(np.median(x.mean(axis=2))) < 0.5 else "brightfield"


class PseudoLabelStats:
    """Sums over the unlabeled pixels of an epoch, per image kind: pixels and pixels above the
    confidence threshold; of those with hidden labels ("judged"), the correct pixels, the confident
    ones and correct among them, and the foreground counts of a Dice."""

    FIELDS = ("pixels", "confident", "judged", "judged_confident", "correct", "confident_correct", "tp", "fp", "fn")

    def __init__(self):
        self.sums = {k: dict.fromkeys(self.FIELDS, 0) for k in KINDS}

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, truth: torch.Tensor | None, kinds: list[str],
               mask: torch.Tensor):
        """teacher_logits: (B, 2, H, W) background-vs-nucleus logits (targets.foreground_logits of the
        teacher's, so a boundary-target run is judged on nuclei, not on its classes); truth: the hidden
        instance maps (B, H, W), or None for images without labels; mask: the pixels counted as
        confident (B, H, W)."""
        if teacher_logits.dim() != 4 or teacher_logits.shape[1] != 2:
            raise ValueError(f"teacher_logits: expected background-vs-nucleus logits (B, 2, H, W), got shape "
                             f"{tuple(teacher_logits.shape)}")
        pseudo = teacher_logits.argmax(dim=1).cpu() > 0
        mask = mask.cpu()
        for i, kind in enumerate(kinds):
            p, m = pseudo[i], mask[i]
            s = self.sums[kind]
            s["pixels"] += p.numel()
            s["confident"] += int(m.sum())
            if truth is None:
                continue
            t = truth[i].cpu() > 0
            ok = p == t
            s["judged"] += p.numel()
            s["judged_confident"] += int(m.sum())
            s["correct"] += int(ok.sum())
            s["confident_correct"] += int((ok & m).sum())
            s["tp"] += int((p & t).sum())
            s["fp"] += int((p & ~t).sum())
            s["fn"] += int((~p & t).sum())

    def summary(self) -> dict[str, float]:
        """Flat log fields: pl_conf_share, and where hidden labels judged the pixels pl_acc, pl_conf_acc
        and pl_dice, overall and per kind seen."""
        out = {}
        total = {f: sum(s[f] for s in self.sums.values()) for f in self.FIELDS}
        for name, s in (("all", total), *self.sums.items()):
            if not s["pixels"]:
                continue
            suffix = "" if name == "all" else f"_{name}"
            out[f"pl_conf_share{suffix}"] = s["confident"] / s["pixels"]
            if not s["judged"]:
                continue
            out[f"pl_acc{suffix}"] = s["correct"] / s["judged"]
            out[f"pl_conf_acc{suffix}"] = s["confident_correct"] / max(1, s["judged_confident"])
            out[f"pl_dice{suffix}"] = 2 * s["tp"] / max(1, 2 * s["tp"] + s["fp"] + s["fn"])
        return out


LOG_FIELDS = tuple(f"{m}{suffix}" for suffix in ("", *(f"_{k}" for k in KINDS))
                   for m in ("pl_acc", "pl_conf_share", "pl_conf_acc", "pl_dice"))
