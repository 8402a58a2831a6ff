"""What the model learns to predict from an instance map (`--target`), and what its classes mean.

  * ``binary``: two classes, background (0) and nucleus (1): the paper's target;
  * ``boundary``: three classes, background (0), nucleus interior (1) and nucleus boundary (2), as
    the DSB2018 winners trained: a nucleus pixel is boundary when one of its 8 neighbours holds
    another label (background or another nucleus), interior otherwise.

The boundary is 1 pixel wide on each nucleus. That already separates the interiors of two touching
nuclei by a band of 2 pixels, so no interior pixel of one nucleus touches one of another, even
diagonally, and instances.decode can grow each interior back into its nucleus. A second pixel costs
small nuclei their interior: on the 3467 nuclei of the bundled sample's label maps, 1 pixel leaves 3
(0.1%) without interior and makes the boundary 17.9% of the nucleus pixels, 2 pixels leave 154
(4.4%) without interior and make it 33.6% (docs/training.md).

The target is made from the augmented crop's labels (nearest sampling keeps every id an id), so its
boundaries are those of the crop as the model sees it. A nucleus cut by the crop's edge is not given a
boundary there: what lies beyond the edge is unknown, so the edge counts as more of the same label.

Class 0 is background in both targets, so the foreground probability is 1 - P(class 0) for every
target (tiling.py) and a target's foreground is its classes > 0.
"""
from __future__ import annotations

import torch

TARGETS = ("binary", "boundary")
NUM_CLASSES = {"binary": 2, "boundary": 3}
BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


def boundary_target(labels: torch.Tensor) -> torch.Tensor:
    """int64 (B, H, W) classes background 0 / interior 1 / boundary 2 of integer instance maps
    (B, H, W) (0 = background, any other id one nucleus)."""
    if labels.dim() != 3 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels: expected integer instance maps (B, H, W), got a {labels.dtype} tensor of "
                         f"shape {tuple(labels.shape)}")
    lab = labels.long()
    h, w = lab.shape[-2:]
    # replicated edges: beyond the crop's edge lies more of the same label (see the module docstring)
    rows = torch.arange(-1, h + 1, device=lab.device).clamp(0, h - 1)
    cols = torch.arange(-1, w + 1, device=lab.device).clamp(0, w - 1)
    padded = lab[:, rows][:, :, cols]
    differs = torch.zeros_like(lab, dtype=torch.bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if (dy, dx) != (1, 1):
                differs |= padded[:, dy:dy + h, dx:dx + w] != lab
    out = torch.where(differs, BOUNDARY, INTERIOR)
    return torch.where(lab > 0, out, BACKGROUND)


def make_target(labels: torch.Tensor, target: str) -> torch.Tensor:
    """int64 (B, H, W) classes of `target` from integer instance maps (B, H, W)."""
    if target == "binary":
        return (labels > 0).long()
    if target == "boundary":
        return boundary_target(labels)
    raise ValueError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")


def foreground_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) background-vs-foreground logits of (B, C, H, W) logits: the background's, and the
    log-sum-exp of every other class's, so that their softmax is (P(background), P(foreground)) of
    the C-class softmax. Two-class logits are returned as they are (the same tensor)."""
    if logits.dim() != 4 or logits.shape[1] < 2:
        raise ValueError(f"logits: expected (B, C >= 2, H, W), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 2:
        return logits
    return torch.cat([logits[:, :1], torch.logsumexp(logits[:, 1:], dim=1, keepdim=True)], dim=1)
