"""Inference at the original resolution, evaluation reports and Figure-3 style overlays."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .augment import normalize
from .data import Sample, resize_sample, stretch_contrast
from .metrics import SegmentationMeter, connected_components, markdown_table

GREEN, RED, YELLOW = (0, 255, 0), (255, 0, 0), (255, 255, 0)


@torch.no_grad()
def foreground_probability(model, image: np.ndarray, size: int, device="cpu") -> np.ndarray:
    """P(foreground) (H, W) for an RGB uint8 image of any size: the image is resized to the model's
    input size and the class probabilities are resized back (bilinear) before taking class 1."""
    x, _ = resize_sample(Sample("", image, np.zeros(image.shape[:2], np.int32)), size)
    x = normalize(x[None].float().to(device) / 255.0)
    probs = model(x)["logits"].float().softmax(dim=1)
    probs = F.interpolate(probs, size=image.shape[:2], mode="bilinear", align_corners=False)
    return probs[0, 1].cpu().numpy()


@torch.no_grad()
def batch_dice(model, images, labels, device="cpu", batch=16):
    """Dice over a resized set (model resolution), for model selection during training."""
    tp = fp = fn = 0
    for i in range(0, images.shape[0], batch):
        x = normalize(images[i:i + batch].float().to(device) / 255.0)
        pred = model(x)["logits"].argmax(dim=1).cpu() > 0
        gt = labels[i:i + batch] > 0
        tp += int((pred & gt).sum())
        fp += int((pred & ~gt).sum())
        fn += int((~pred & gt).sum())
    return 1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def overlay(image: np.ndarray, pred_mask: np.ndarray, gt_mask: np.ndarray | None = None, alpha=0.6,
            stretch=False):
    """Prediction green, ground truth red, their overlap yellow (the paper's Figure 3); `stretch`
    shows the image contrast-stretched as the model sees it (dim fluorescence becomes visible)."""
    out = (stretch_contrast(image) if stretch else image).astype(np.float32)
    p = pred_mask > 0
    colour = np.zeros_like(out)
    paint = p.copy()
    colour[p] = GREEN
    if gt_mask is not None:
        g = gt_mask > 0
        colour[g & ~p] = RED
        colour[g & p] = YELLOW
        paint |= g
    out[paint] = (1 - alpha) * out[paint] + alpha * colour[paint]
    return out.round().clip(0, 255).astype(np.uint8)


def save_label_map(path, instances: np.ndarray):
    """uint16 PNG or TIFF (by extension) of an instance map."""
    if instances.max(initial=0) > 65535:
        raise ValueError(f"instances: more than 65535 nuclei cannot be written to {path}")
    Image.fromarray(instances.astype(np.uint16)).save(path)


@torch.no_grad()
def evaluate_samples(model, samples, size, device="cpu", out_dir=None, overlays=0, threshold=0.5,
                     progress=True):
    """Metrics of `model` on full-resolution samples; optional overlays of the first `overlays`."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    meter = SegmentationMeter()
    if out_dir and overlays:
        os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    for k, s in enumerate(tqdm(samples, desc="evaluating", leave=False, disable=not progress)):
        pred = foreground_probability(model, s.image, size, device) > threshold
        meter.update(pred, s.labels, s.id)
        if out_dir and k < overlays:
            Image.fromarray(overlay(s.image, pred, s.labels, stretch=True)).save(
                os.path.join(out_dir, "overlays", f"{s.id}.png"))
    model.train(was_training)
    return meter


def write_report(meter: SegmentationMeter, out_dir, name="metrics", title="Test metrics", extra=None):
    os.makedirs(out_dir, exist_ok=True)
    summary = meter.summary()
    report = {**(extra or {}), **summary,
              "note": "over_set: counts/terms summed over all images then one ratio; per_image_mean: "
                      "mean of per-image ratios; 0/0 counts as 1",
              "per_image": meter.per_image}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown_table(summary, title))
    return summary


def predicted_instances(prob: np.ndarray, threshold=0.5):
    return connected_components(prob > threshold)
