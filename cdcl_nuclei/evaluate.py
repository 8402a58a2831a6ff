"""Prediction on whole images, evaluation against ground truth with the Otsu baseline beside the
model, reports and Figure-3 style overlays."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .baseline import otsu_mask
from .data import resize_image, stretch_contrast
from .metrics import SegmentationMeter, markdown_table
from .tiling import check_window, foreground_probability

GREEN, RED, YELLOW = (0, 255, 0), (255, 0, 0), (255, 255, 0)


@dataclass
class InferenceConfig:
    """How a whole image becomes a probability map. `resize`: the paper's protocol (the image is
    resized to resize x resize, predicted in one window, and the probabilities resized back);
    None: native resolution over overlapping windows."""
    window: int = 256
    overlap: int = 64
    batch: int = 8
    threshold: float = 0.5
    resize: int | None = None
    flips: bool = True  # test-time augmentation: the mean over the four flips of each window

    def __post_init__(self):
        check_window(self.window, self.overlap)
        if self.resize is not None:
            check_window(self.resize, 0)
        if not 0.0 < self.threshold < 1.0:  # also refuses NaN
            raise ValueError(f"threshold: expected a probability in (0, 1), got {self.threshold}")
        if self.batch < 1:
            raise ValueError(f"batch: expected >= 1, got {self.batch}")


def inference_config(d: dict) -> InferenceConfig:
    return InferenceConfig(**{k: d[k] for k in asdict(InferenceConfig()) if k in d})


@torch.no_grad()
def predict_probability(model, image: np.ndarray, cfg: InferenceConfig, device="cpu",
                        progress=False) -> np.ndarray:
    """P(foreground) float32 (H, W) for a raw uint8 RGB image (H, W, 3) of any size."""
    x = stretch_contrast(image)
    if cfg.resize is None:
        return foreground_probability(model, x, cfg.window, cfg.overlap, cfg.batch, device, progress, cfg.flips)
    small = foreground_probability(model, resize_image(x, cfg.resize), cfg.resize, 0, 1, device, flips=cfg.flips)
    prob = F.interpolate(torch.from_numpy(small)[None, None], size=image.shape[:2], mode="bilinear",
                         align_corners=False)
    return prob[0, 0].numpy()


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


class Comparison:
    """The model's and Otsu's metrics on the same images."""

    def __init__(self, instances=True):
        self.model, self.otsu = SegmentationMeter(instances), SegmentationMeter(instances)

    def update(self, pred: np.ndarray, image: np.ndarray, labels: np.ndarray, name: str):
        self.model.update(pred, labels, name)
        self.otsu.update(otsu_mask(image), labels, name)


@torch.no_grad()
def evaluate_samples(model, samples, cfg: InferenceConfig, device="cpu", out_dir=None, overlays=0,
                     progress=True, instances=True) -> Comparison:
    """Model and Otsu on samples at their stored resolution; overlays of the first `overlays`."""
    from tqdm import tqdm

    comp = Comparison(instances)
    if out_dir and overlays:
        os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    for k, s in enumerate(tqdm(samples, desc="evaluating", leave=False, disable=not progress)):
        pred = predict_probability(model, s.image, cfg, device) > cfg.threshold
        comp.update(pred, s.image, s.labels, s.id)
        if out_dir and k < overlays:
            Image.fromarray(overlay(s.image, pred, s.labels, stretch=True)).save(
                os.path.join(out_dir, "overlays", f"{s.id}.png"))
    return comp


def validation_dice(model, samples, cfg: InferenceConfig, device="cpu") -> float:
    """Foreground Dice over the set, at native resolution: the model-selection score (without the
    flips, a quarter of the cost, since it runs every epoch)."""
    cfg = replace(cfg, flips=False)
    meter = SegmentationMeter(instances=False)
    for s in samples:
        meter.update(predict_probability(model, s.image, cfg, device) > cfg.threshold, s.labels, s.id)
    return meter.summary()["over_set"]["DC"]


def otsu_dice(samples) -> float:
    """Otsu's foreground Dice over the set: the no-learning reference for the validation score."""
    meter = SegmentationMeter(instances=False)
    for s in samples:
        meter.update(otsu_mask(s.image), s.labels, s.id)
    return meter.summary()["over_set"]["DC"]


def _difference(a: dict, b: dict) -> dict:
    return {part: {k: a[part][k] - b[part][k] for k in a[part]} for part in ("over_set", "per_image_mean")}


def write_report(comp: Comparison, out_dir, name="metrics", title="Test metrics", extra=None):
    """OUT/name.json and name.md: the model, Otsu and model - Otsu, over the set and per image.
    Returns the report dict."""
    os.makedirs(out_dir, exist_ok=True)
    model, otsu = comp.model.summary(), comp.otsu.summary()
    diff = _difference(model, otsu)
    per_image = [{"image": m["image"], "model": {k: v for k, v in m.items() if k != "image"},
                  "otsu": {k: v for k, v in o.items() if k != "image"}}
                 for m, o in zip(comp.model.per_image, comp.otsu.per_image)]
    report = {**(extra or {}), "images": model["images"], "model": model, "otsu": otsu,
              "model_minus_otsu": diff,
              "note": "over_set: counts/terms summed over all images then one ratio; per_image_mean: "
                      "mean of per-image ratios; 0/0 counts as 1. otsu: Otsu's threshold on the "
                      "grayscale image, foreground = the minority side (no learning).",
              "per_image": per_image}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [markdown_table(model, f"{title}: model"), markdown_table(otsu, f"{title}: Otsu baseline"),
             f"## {title}: model - Otsu (points of %)", "",
             "| | " + " | ".join(diff["over_set"]) + " |", "|---" * (len(diff["over_set"]) + 1) + "|"]
    for part, label in (("over_set", "over the set"), ("per_image_mean", "mean per image")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:+.2f}" for v in diff[part].values()) + " |")
    lines += ["", "## Per image (Dice %)", "", "| image | model | Otsu | model - Otsu |", "|---|---|---|---|"]
    for r in per_image:
        m, o = 100 * r["model"]["DC"], 100 * r["otsu"]["DC"]
        lines.append(f"| {r['image']} | {m:.2f} | {o:.2f} | {m - o:+.2f} |")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return report


def summary_lines(report: dict) -> list[str]:
    """The two lines the scripts print last: the model and Otsu, Dice over the set and per image."""
    m, o = report["model"], report["otsu"]
    return [f"model: Dice over the set {100 * m['over_set']['DC']:.2f}, mean per image "
            f"{100 * m['per_image_mean']['DC']:.2f} on {report['images']} images",
            f"Otsu:  Dice over the set {100 * o['over_set']['DC']:.2f}, mean per image "
            f"{100 * o['per_image_mean']['DC']:.2f}; model - Otsu "
            f"{100 * (m['over_set']['DC'] - o['over_set']['DC']):+.2f} / "
            f"{100 * (m['per_image_mean']['DC'] - o['per_image_mean']['DC']):+.2f} points"]
