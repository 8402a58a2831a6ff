"""The no-learning baseline shown beside every model: Otsu's threshold on the grayscale image.

Grayscale is the luminance 0.2125 R + 0.7154 G + 0.0721 B; the threshold maximises the between-class
variance of a 256-bin histogram over the image's intensity range (the definition of
scikit-image's `threshold_otsu`); foreground is the minority side of the threshold, so bright nuclei
on a dark background and dark nuclei on a bright stain are both found.
"""
from __future__ import annotations

import numpy as np

LUMA = (0.2125, 0.7154, 0.0721)


def grayscale(image: np.ndarray) -> np.ndarray:
    """float64 (H, W) from a grey (H, W) or RGB (H, W, 3) image."""
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[2] >= 3:
        return a[..., 0] * LUMA[0] + a[..., 1] * LUMA[1] + a[..., 2] * LUMA[2]
    raise ValueError(f"image: expected (H, W) or (H, W, 3), got shape {a.shape}")


def otsu_threshold(gray: np.ndarray, bins: int = 256) -> float:
    """The intensity t maximising the between-class variance of `gray <= t` against `gray > t`."""
    g = np.asarray(gray, dtype=np.float64).ravel()
    if g.size == 0:
        raise ValueError("gray: empty image")
    lo, hi = float(g.min()), float(g.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(g, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts).astype(np.float64)             # pixels in bins 0..k
    w1 = w0[-1] - w0                                       # pixels above bin k
    s0 = np.cumsum(counts * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def otsu_mask(image: np.ndarray) -> np.ndarray:
    """bool (H, W): the minority side of Otsu's threshold on the grayscale image."""
    g = grayscale(image)
    upper = g > otsu_threshold(g)
    return upper if upper.sum() * 2 <= upper.size else ~upper
