"""Native-resolution inference over overlapping, blended windows, for images of any size.

One function, `probability_maps` (`foreground_probability`: its first map), serves validation, the
test evaluation and predict.py. The image is cut into windows of at most `window` pixels a side (an
axis shorter than the window gets a window of that length rounded up to the model's stride), the
windows run through the model in batches, and their foreground probabilities (and the interior
probabilities of a boundary-target model, when asked for) are blended with a weight that falls to
nearly zero towards each window's edge (where the network sees the least context). Borders are filled
by mirroring the image. Memory is that of the output maps plus one batch of windows, whatever the
size of the image.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .augment import normalize

STRIDE = 32  # the DenseUNet's input must be divisible by its total downsampling


def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Window offsets along one axis of `length` (>= window): evenly spread, first at 0, last at
    length - window, neighbours overlapping by at least `overlap`."""
    if length <= window:
        return [0]
    n = 1 + int(math.ceil((length - window) / max(1, window - overlap)))
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def blend_weight(h: int, w: int, overlap: int) -> torch.Tensor:
    """(h, w) weight: 1 inside, a raised-cosine ramp over `overlap` pixels at every edge, never 0."""
    def ramp(n):
        r = torch.ones(n, dtype=torch.float32)
        k = min(overlap, n // 2)
        if k > 0:
            t = (torch.arange(k, dtype=torch.float32) + 0.5) / k
            edge = 0.5 - 0.5 * torch.cos(math.pi * t)
            r[:k] = edge
            r[n - k:] = torch.minimum(r[n - k:], edge.flip(0))
        return r.clamp_min(1e-3)
    return ramp(h)[:, None] * ramp(w)[None, :]


def check_window(window: int, overlap: int) -> None:
    if window < STRIDE or window % STRIDE:
        raise ValueError(f"window: expected a positive multiple of {STRIDE}, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap: expected 0 <= overlap < window ({window}), got {overlap}")


def _window_maps(model, x, flips, interior):
    """(B, 1 or 2, h, w): the foreground probability (every class but 0) and, with `interior`, the
    interior probability (class 1 of a boundary-target model, targets.py)."""
    def maps(xf):
        logits = model(xf)["logits"].float()
        if interior and logits.shape[1] < 3:
            raise ValueError(f"interior: the model predicts {logits.shape[1]} classes; the interior probability "
                             "needs a boundary-target model (3 classes)")
        p = logits.softmax(dim=1)
        fg = (1.0 - p[:, 0])[:, None]
        return torch.cat([fg, p[:, 1:2]], dim=1) if interior else fg

    if not flips:
        return maps(x)
    total = 0.0
    for dims in ((), (-1,), (-2,), (-2, -1)):
        xf = x.flip(dims) if dims else x
        p = maps(xf)
        total = total + (p.flip(dims) if dims else p)
    return total / 4


@torch.no_grad()
def probability_maps(model, image: np.ndarray, window: int = 256, overlap: int = 64, batch: int = 8, device="cpu",
                     progress: bool = False, flips: bool = False, interior: bool = False) -> np.ndarray:
    """float32 (K, H, W) for a contrast-stretched uint8 (H, W, 3) image: P(foreground) and, with
    `interior` (a boundary-target model), P(interior); K = 1 or 2.

    The model is called in eval mode on (batch, 3, h, w) windows normalised as in training and must
    return {'logits': (batch, C, h, w)}; foreground is every class but 0. `flips`: test-time
    augmentation, the mean probability over the four horizontal/vertical flips of each window.
    """
    check_window(window, overlap)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    wh, ww = min(window, _round_up(h, STRIDE)), min(window, _round_up(w, STRIDE))
    ph, pw = max(h, wh), max(w, ww)
    # mirror padding only where the image is shorter than its window
    padded = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="symmetric") if (ph, pw) != (h, w) else image
    src = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)  # uint8 view, no copy of floats
    acc = torch.zeros(2 if interior else 1, ph, pw, dtype=torch.float32)
    wsum = torch.zeros(ph, pw, dtype=torch.float32)
    weight = blend_weight(wh, ww, overlap)
    spots = [(y, x) for y in window_starts(ph, wh, overlap) for x in window_starts(pw, ww, overlap)]
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(spots), desc="windows", leave=False, dynamic_ncols=True)
    try:
        for i in range(0, len(spots), batch):
            part = spots[i:i + batch]
            x = torch.stack([src[:, y:y + wh, x_:x_ + ww] for y, x_ in part]).float().div_(255.0)
            maps = _window_maps(model, normalize(x).to(device), flips, interior).cpu()
            for (y, x_), p in zip(part, maps):
                acc[:, y:y + wh, x_:x_ + ww] += p * weight
                wsum[y:y + wh, x_:x_ + ww] += weight
            if bar is not None:
                bar.update(len(part))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return (acc / wsum)[:, :h, :w].numpy()


def foreground_probability(model, image: np.ndarray, window: int = 256, overlap: int = 64,
                           batch: int = 8, device="cpu", progress: bool = False, flips: bool = False) -> np.ndarray:
    """P(foreground) as float32 (H, W) (`probability_maps` without the interior)."""
    return probability_maps(model, image, window, overlap, batch, device, progress, flips)[0]
