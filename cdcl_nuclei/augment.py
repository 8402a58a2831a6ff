"""The weak/strong augmentation pair, on batched tensors with an explicit generator.

Geometry (random flip, random crop, rotation in [-15, 15] degrees) is one affine warp per image,
applied to the image (bilinear) and the labels (nearest) with the same parameters. The weak view is
the warped image; the strong view is the same warped image plus the photometric part (Gaussian blur,
colour jitter, grayscale), which moves no pixel, so the two views stay pixel-aligned. Reflection
padding fills what the rotation uncovers, in the image and the labels alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    flip: bool = True
    max_rotation: float = 15.0      # degrees
    # side of the sampled region over the output side: below 1 zooms in (the paper's random crop of
    # a whole image: 0.7-1.0); native-resolution crops use a range around 1 (scale augmentation)
    scale: tuple = (0.7, 1.0)
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 1.5)  # in pixels of the model input
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    gray_p: float = 0.2


def _uniform(n, lo, hi, g):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def sample_geometry(n, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine matrices mapping output to input normalised coordinates."""
    flip_x = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    flip_y = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    angle = _uniform(n, -cfg.max_rotation, cfg.max_rotation, g) * (math.pi / 180.0)
    lo, hi = cfg.scale
    # log-uniform, so zooming in and out by the same factor are equally likely
    scale = torch.exp(_uniform(n, math.log(lo), math.log(hi), g))
    # the crop centre moves only as far as keeps the (unrotated) crop inside the image
    cx = _uniform(n, -1.0, 1.0, g) * (1.0 - scale).abs()
    cy = _uniform(n, -1.0, 1.0, g) * (1.0 - scale).abs()
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    return theta


def warp(images, theta, labels=None):
    """images float (B, C, H, W); labels integer (B, H, W) or None."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if labels is None:
        return out, None
    # ids up to 2^24 are exact in float32; nearest sampling never mixes two ids
    lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="reflection",
                        align_corners=False)
    return out, lab[:, 0].round().to(labels.dtype)


def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blur(x, sigma):
    """Separable Gaussian blur of one image (C, H, W) with reflection at the borders."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y[0]


def photometric(images, cfg: AugmentConfig, g: torch.Generator):
    """Colour jitter, grayscale and blur on float images in [0, 1] (B, 3, H, W); no pixel moves."""
    n = images.shape[0]
    out = images.clone()
    jitter = torch.rand(n, generator=g) < cfg.jitter_p
    b = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, g)
    c = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g)
    s = _uniform(n, 1 - cfg.saturation, 1 + cfg.saturation, g)
    gray = torch.rand(n, generator=g) < cfg.gray_p
    blur = torch.rand(n, generator=g) < cfg.blur_p
    sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], g)
    for i in range(n):
        x = out[i:i + 1]
        if jitter[i]:
            x = (x * b[i]).clamp(0, 1)
            x = ((x - _gray(x).mean()) * c[i] + _gray(x).mean()).clamp(0, 1)
            x = ((x - _gray(x)) * s[i] + _gray(x)).clamp(0, 1)
        if gray[i]:
            x = _gray(x).expand_as(x)
        if blur[i]:
            x = _blur(x[0], float(sigma[i]))[None]
        out[i] = x[0]
    return out


def to_float(images_uint8):
    return images_uint8.float() / 255.0


def labeled_view(images, labels, cfg: AugmentConfig, g: torch.Generator):
    """Augmented labeled batch: geometry on image and labels, then the photometric part."""
    theta = sample_geometry(images.shape[0], cfg, g)
    x, y = warp(to_float(images), theta, labels)
    return photometric(x, cfg, g), y


def weak_strong_pair(images, cfg: AugmentConfig, g: torch.Generator, labels=None):
    """(weak, strong[, labels]) views sharing one geometry per image."""
    theta = sample_geometry(images.shape[0], cfg, g)
    weak, y = warp(to_float(images), theta, labels)
    strong = photometric(weak, cfg, g)
    return (weak, strong) if labels is None else (weak, strong, y)


def cutmix_masks(n, height, width, cell, g: torch.Generator):
    """(n, 1, height, width) float masks, 1 inside one box per image: the region that image takes from
    its partner in a CutMix of the unlabeled batch (French et al., 2020). Box sides and corners are
    whole multiples of `cell`, so that the mask taken at any stride dividing `cell` is the box itself
    and teacher outputs at lower resolution mix exactly like the pixels."""
    rows, cols = height // cell, width // cell
    if rows < 2 or cols < 2:
        raise ValueError(f"cutmix: a crop of {height}x{width} has fewer than 2x2 cells of {cell} pixels")
    # box sides between a quarter and three quarters of the crop: 6-56% of its area, about a third on average
    def side(k):
        lo, hi = max(1, k // 4), max(1, (3 * k) // 4)
        return torch.randint(lo, hi + 1, (n,), generator=g)
    h, w = side(rows), side(cols)
    top = (torch.rand(n, generator=g) * (rows - h + 1)).long()
    left = (torch.rand(n, generator=g) * (cols - w + 1)).long()
    masks = torch.zeros(n, 1, height, width)
    for i in range(n):
        masks[i, :, top[i] * cell:(top[i] + h[i]) * cell, left[i] * cell:(left[i] + w[i]) * cell] = 1.0
    return masks


def cutmix(x, masks):
    """Each image of x (B, C, H, W), with its mask's box taken from the previous image of the batch
    (cyclically); `masks` (B, 1, h, w) at any resolution whose stride divides x's box cells (nearest
    sampling keeps it exact)."""
    if masks.shape[-2:] != x.shape[-2:]:
        masks = F.interpolate(masks, size=x.shape[-2:], mode="nearest")
    masks = masks.to(device=x.device, dtype=x.dtype)
    return x * (1 - masks) + torch.roll(x, 1, dims=0) * masks


def normalize(x):
    """Inputs in [0, 1] -> roughly zero-mean unit-range inputs for the network."""
    return (x - 0.5) / 0.25
