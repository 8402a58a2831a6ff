"""Random training crops at each image's own pixel scale.

Every crop is a `size` x `size` window at a uniformly drawn position; an image shorter than the
crop along an axis is mirrored out to it first. Image and labels are cut with the same offsets.
"""
from __future__ import annotations

import numpy as np
import torch

from .data import Sample


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    ph, pw = max(0, size - a.shape[0]), max(0, size - a.shape[1])
    if not (ph or pw):
        return a
    widths = ((0, ph), (0, pw)) + ((0, 0),) * (a.ndim - 2)
    return np.pad(a, widths, mode="symmetric")


def random_crops(samples: list[Sample], idx, size: int, g: torch.Generator):
    """(images uint8 (B, 3, size, size), labels int32 (B, size, size)) for samples[idx]; labels None
    unless every one of them has labels (the user's unlabeled images have none)."""
    images, labels = [], []
    for i in idx:
        s = samples[i]
        img = _pad_to(s.image, size)
        h, w = img.shape[:2]
        y = int(torch.randint(0, h - size + 1, (1,), generator=g))
        x = int(torch.randint(0, w - size + 1, (1,), generator=g))
        images.append(torch.from_numpy(np.ascontiguousarray(img[y:y + size, x:x + size])).permute(2, 0, 1))
        if s.labels is not None:
            labels.append(torch.from_numpy(np.ascontiguousarray(_pad_to(s.labels, size)[y:y + size, x:x + size])))
    return torch.stack(images), (torch.stack(labels).to(torch.int32) if len(labels) == len(images) else None)
