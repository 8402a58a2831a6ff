"""The no-learning pipeline shown beside every model: Otsu's threshold on the grayscale image, split
into nuclei by the same decoding code as the model (`instances.CLASSICAL`: a distance-transform
watershed, untuned, as CellProfiler and Fiji users run it, or the 4-connected components).

Grayscale is the luminance 0.2125 R + 0.7154 G + 0.0721 B; the threshold is scikit-image's
`threshold_otsu` (256 bins over the image's intensity range). The foreground side:
  * ``minority`` (the reports' default): the side with fewer pixels, so bright nuclei on a dark
    fluorescence background and dark nuclei on a bright stain are both found where nuclei cover less
    than half the image (DSB2018);
  * ``dark``: at or below the threshold, the fair reference on H&E tissue, where nuclei and dense
    stroma are often the darker majority and the minority side is the bright background (MoNuSeg,
    `experiments/otsu_polarity.py`);
  * ``bright``: above the threshold.
"""
from __future__ import annotations

import numpy as np

from .instances import CLASSICAL, COMPONENTS, decode

LUMA = (0.2125, 0.7154, 0.0721)
SIDES = ("minority", "dark", "bright")


def grayscale(image: np.ndarray) -> np.ndarray:
    """float64 (H, W) from a grey (H, W) or RGB (H, W, 3) image."""
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[2] >= 3:
        return a[..., 0] * LUMA[0] + a[..., 1] * LUMA[1] + a[..., 2] * LUMA[2]
    raise ValueError(f"image: expected (H, W) or (H, W, 3), got shape {a.shape}")


def otsu_threshold(gray: np.ndarray, bins: int = 256) -> float:
    """The intensity t maximising the between-class variance of `gray <= t` against `gray > t`
    (the centre of a histogram bin over the image's range; a constant image gives its value)."""
    from skimage.filters import threshold_otsu

    g = np.asarray(gray, dtype=np.float64)
    if g.size == 0:
        raise ValueError("gray: empty image")
    return float(threshold_otsu(g, nbins=bins))


def otsu_mask(image: np.ndarray, side: str = "minority") -> np.ndarray:
    """bool (H, W): one side of Otsu's threshold on the grayscale image (see the module docstring)."""
    if side not in SIDES:
        raise ValueError(f"side: expected one of {', '.join(SIDES)}, got {side!r}")
    g = grayscale(image)
    upper = g > otsu_threshold(g)
    if side == "minority":
        side = "bright" if upper.sum() * 2 <= upper.size else "dark"
    return upper if side == "bright" else ~upper


def classical_instances(image: np.ndarray, method: str = "watershed", side: str = "minority") -> np.ndarray:
    """int32 (H, W) nuclei of the classical pipeline: Otsu's foreground, split by the untuned
    watershed (`method="watershed"`) or into its 4-connected components (`"components"`)."""
    decodings = {"watershed": CLASSICAL, "components": COMPONENTS}
    if method not in decodings:
        raise ValueError(f"method: expected one of {', '.join(decodings)}, got {method!r}")
    return decode(otsu_mask(image, side), decoding=decodings[method])
