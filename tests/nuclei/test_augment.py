import math

import pytest
import torch

from cdcl_nuclei import augment


def _blobs(n=4, size=48, seed=0):
    """uint8 images with bright discs on black and their instance labels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(n, size, size, dtype=torch.int32)
    for b in range(n):
        for k in range(1, 6):
            cy, cx = torch.randint(6, size - 6, (2,), generator=g).tolist()
            labels[b][(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = k
    images = ((labels > 0).to(torch.uint8) * 200 + 20)[:, None].repeat(1, 3, 1, 1)
    return images, labels


def test_no_photometric_means_identical_views():
    images, _ = _blobs()
    cfg = augment.AugmentConfig(blur_p=0.0, jitter_p=0.0, gray_p=0.0)
    weak, strong = augment.weak_strong_pair(images, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(weak, strong)


def test_views_stay_pixel_aligned_with_each_other_and_the_labels():
    images, labels = _blobs(n=6)
    cfg = augment.AugmentConfig()
    weak, strong, y = augment.weak_strong_pair(images, cfg, torch.Generator().manual_seed(2), labels)
    fg = y > 0
    # the weak view is the warped image: thresholding it gives the warped labels up to the
    # bilinear disc borders
    agree = ((weak.mean(1) > 0.45) == fg).float().mean()
    assert agree > 0.97
    assert not torch.equal(weak, strong)
    for b in range(images.shape[0]):
        s = strong[b].mean(0)
        # photometric changes keep nuclei brighter than background at the same pixels
        assert s[fg[b]].mean() > s[~fg[b]].mean() + 0.1
        # and the strong view is a per-image monotone map of the weak one away from borders
        w = weak[b].mean(0)
        inner = torch.nn.functional.max_pool2d((~fg[b]).float()[None, None], 5, 1, 2)[0, 0] == 0
        if inner.any():
            assert s[inner].mean() > s[~fg[b]].mean()
            assert w[inner].mean() > 0.7


def test_geometry_is_a_rotation_within_15_degrees_with_crop_and_flips():
    cfg = augment.AugmentConfig()
    theta = augment.sample_geometry(500, cfg, torch.Generator().manual_seed(3))
    a = theta[:, :, :2]
    det = torch.linalg.det(a)
    scale = det.abs().sqrt()
    assert (scale >= cfg.scale[0] - 1e-6).all() and (scale <= cfg.scale[1] + 1e-6).all()
    # remove the flips, then the rotation angle is atan2(sin, cos) of the first column
    flip_x = torch.sign(a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0])
    angle = torch.rad2deg(torch.atan2(a[:, 1, 0], a[:, 0, 0]).abs())
    angle = torch.minimum(angle, 180 - angle)
    assert angle.max() <= 15 + 1e-4 and angle.max() > 10
    assert (flip_x < 0).any() and (flip_x > 0).any()


def test_labels_use_nearest_sampling():
    images, labels = _blobs(n=3)
    x, y = augment.labeled_view(images, labels * 1000, augment.AugmentConfig(), torch.Generator().manual_seed(5))
    assert y.dtype == labels.dtype
    assert set(y.unique().tolist()) <= set((labels * 1000).unique().tolist())
    assert x.shape == (3, 3, 48, 48) and 0 <= x.min() and x.max() <= 1


def test_same_generator_same_views():
    images, _ = _blobs()
    a = augment.weak_strong_pair(images, augment.AugmentConfig(), torch.Generator().manual_seed(9))
    b = augment.weak_strong_pair(images, augment.AugmentConfig(), torch.Generator().manual_seed(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_blur_preserves_mean_and_position():
    x = torch.zeros(3, 21, 21)
    x[:, 10, 10] = 1.0
    y = augment._blur(x, 1.2)
    assert y.sum().item() == pytest.approx(3.0, rel=1e-5)
    assert (y[0] == y[0].max()).nonzero().tolist() == [[10, 10]]
    assert math.isclose(y[0, 10, 9].item(), y[0, 10, 11].item(), rel_tol=1e-6)
