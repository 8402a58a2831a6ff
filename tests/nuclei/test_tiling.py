"""Tiled native-resolution inference, training crops, the Otsu baseline, and the package split."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from cdcl_nuclei import baseline, crops, data, models, tiling
from cdcl_nuclei.augment import normalize
from cdcl_nuclei.evaluate import InferenceConfig, predict_probability


class Pointwise(torch.nn.Module):
    """A model without context: each output pixel depends on its own input pixel only."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        torch.nn.init.normal_(self.conv.weight)

    def forward(self, x):
        return {"logits": self.conv(x)}


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _whole(model, image):
    """Whole-image inference of a model that takes the image in one piece."""
    x = normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0)
    with torch.no_grad():
        return (1 - model(x)["logits"].softmax(1)[0, 0]).numpy()


@pytest.mark.parametrize("shape", [(256, 256), (300, 517), (37, 90), (1, 1), (96, 33)])
def test_tiled_equals_whole_for_a_pointwise_model(shape):
    model = Pointwise().eval()
    img = _image(*shape)
    tiled = tiling.foreground_probability(model, img, window=64, overlap=16, batch=3)
    assert tiled.shape == shape and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, _whole(model, img), rtol=1e-5, atol=1e-6)


def test_tiled_equals_whole_for_a_real_model_in_one_window():
    torch.manual_seed(0)
    model = models.build_model(models.model_config("tiny")).eval()
    img = _image(96, 128, 3)
    tiled = tiling.foreground_probability(model, img, window=128, overlap=32)
    np.testing.assert_allclose(tiled, _whole(model, img), rtol=1e-5, atol=1e-6)


def test_windows_cover_every_pixel_and_overlap():
    for length, window, overlap in [(1000, 256, 64), (257, 256, 64), (256, 256, 0), (5000, 512, 128)]:
        starts = tiling.window_starts(length, window, overlap)
        assert starts[0] == 0 and starts[-1] == length - window
        assert all(b - a <= window - overlap for a, b in zip(starts, starts[1:]))
    w = tiling.blend_weight(64, 96, 16)
    assert w.shape == (64, 96) and float(w.min()) > 0 and float(w[32, 48]) == 1.0
    assert float(w[0, 48]) < 0.05


def test_large_image_memory_is_bounded():
    """A 4000 x 4000 image: the peak of extra memory stays a small multiple of the output map (no
    per-window or per-pixel-times-classes growth)."""
    psutil = pytest.importorskip("psutil")
    code = (
        "import numpy as np, torch, psutil, resource\n"
        "from cdcl_nuclei import tiling\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(s): super().__init__(); s.c = torch.nn.Conv2d(3, 2, 1)\n"
        "    def forward(s, x): return {'logits': s.c(x)}\n"
        "img = np.zeros((4000, 4000, 3), np.uint8); img[::7] = 200\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "p = tiling.foreground_probability(M().eval(), img, window=512, overlap=64, batch=4)\n"
        "assert p.shape == (4000, 4000)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    extra = int(r.stdout.strip().splitlines()[-1])
    out_map = 4000 * 4000 * 4
    # accumulator + weight sum + the returned map, plus one batch of windows: well under 6 maps
    assert extra < 6 * out_map, extra / out_map
    del psutil


def test_inference_config_checks():
    for bad in (dict(window=100), dict(window=0), dict(overlap=256), dict(overlap=-1), dict(threshold=float("nan")),
                dict(threshold=1.0), dict(batch=0), dict(resize=50)):
        with pytest.raises(ValueError, match=next(iter(bad)) if "resize" not in bad else "window"):
            InferenceConfig(**bad)


def test_resize_protocol_returns_the_image_size():
    model = Pointwise().eval()
    img = _image(50, 70)
    p = predict_probability(model, img, InferenceConfig(resize=64))
    assert p.shape == (50, 70) and np.isfinite(p).all()


def test_crops_keep_image_and_labels_aligned():
    rng = np.random.default_rng(0)
    h, w = 90, 130
    labels = rng.integers(0, 50, size=(h, w)).astype(np.int32)
    # the image encodes each pixel's own label, so any misalignment shows
    image = np.stack([labels * 5 % 256, labels, np.zeros_like(labels)], axis=2).astype(np.uint8)
    samples = [data.Sample("a", image, labels), data.Sample("b", image[:40, :50], labels[:40, :50])]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = crops.random_crops(samples, [0, 1, 0], 64, g)
        assert x.shape == (3, 3, 64, 64) and y.shape == (3, 64, 64) and x.dtype == torch.uint8
        assert torch.equal(x[:, 1].to(torch.int32), y)
    # a crop that fits is a window of the image at its own scale
    x, y = crops.random_crops(samples[:1], [0], 64, torch.Generator().manual_seed(3))
    hits = [(r, c) for r in range(h - 63) for c in range(w - 63)
            if np.array_equal(labels[r:r + 64, c:c + 64], y[0].numpy())]
    assert len(hits) == 1


def test_otsu_hand_computed():
    # two populations, 30 pixels at 10 and 70 at 200: every threshold between them separates them
    # perfectly; the histogram (bins over [10, 200]) puts it in the first bin
    g = np.array([10.0] * 30 + [200.0] * 70).reshape(10, 10)
    t = baseline.otsu_threshold(g)
    assert 10 <= t < 200 and t == pytest.approx(10 + 190 / 512)
    # three levels 0 (50 px), 100 (30 px), 110 (20 px): by hand, the between-class variance of
    # {0} vs {100, 110} is 0.5*0.5*(0-104)^2 = 2704, of {0, 100} vs {110} is 0.8*0.2*(37.5-110)^2 = 841
    g3 = np.array([0.0] * 50 + [100.0] * 30 + [110.0] * 20)
    t3 = baseline.otsu_threshold(g3)
    assert 0 <= t3 < 100
    # bright nuclei on dark background and dark nuclei on a bright stain: the minority side is found
    img = np.full((20, 20, 3), 30, np.uint8)
    img[5:9, 5:9] = 220
    m = baseline.otsu_mask(img)
    assert m.sum() == 16 and m[5:9, 5:9].all()
    assert np.array_equal(baseline.otsu_mask(255 - img), m)
    assert baseline.grayscale(np.full((2, 2, 3), [100, 0, 0], np.uint8))[0, 0] == pytest.approx(21.25)


def test_import_cdcl_ops_pulls_no_training_dependency():
    code = ("import sys, torch\n"
            "before = set(sys.modules)\n"
            "import cdcl_ops\n"
            "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
            "bad = sorted(new & {'PIL', 'scipy', 'tqdm', 'cdcl_nuclei', 'tensorboard', 'matplotlib'})\n"
            "bad += [m for m in ('PIL', 'scipy', 'cdcl_nuclei') if m in sys.modules and m not in bad]\n"
            "print(','.join(bad))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"import cdcl_ops imported {r.stdout.strip()}"


def test_flips_average_the_four_flipped_predictions():
    torch.manual_seed(1)
    model = models.build_model(models.model_config("tiny")).eval()
    img = _image(64, 96, 5)
    got = tiling.foreground_probability(model, img, window=128, overlap=0, flips=True)
    want = np.mean([np.flip(_whole(model, np.ascontiguousarray(np.flip(img, axis=ax))), axis=ax) if ax else
                    _whole(model, img) for ax in ((), (1,), (0,), (0, 1))], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a pointwise model does not care about flips
    pw = Pointwise().eval()
    np.testing.assert_allclose(tiling.foreground_probability(pw, img, 64, 16, flips=True), _whole(pw, img),
                               rtol=1e-5, atol=1e-6)
