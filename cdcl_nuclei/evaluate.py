"""Prediction on whole images, evaluation against ground truth with the classical pipeline (Otsu +
watershed) beside the model, reports and Figure-3 style overlays."""
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
from .imagefiles import write_labels as save_label_map  # noqa: F401  (the name tests/test_nuclei_imagefiles.py imports)
from .instances import CLASSICAL, COMPONENTS, DEFAULT, Decoding, decode
from .metrics import NOTE, SegmentationMeter
from .tiling import check_window, probability_maps

GREEN, RED, YELLOW = (0, 255, 0), (255, 0, 0), (255, 255, 0)
# the rows of every report: the model decoded its way and as components, and the classical pipeline
PIPELINES = ("model", "model_components", "otsu", "otsu_components")


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
def predict_maps(model, image: np.ndarray, cfg: InferenceConfig, device="cpu", progress=False,
                 interior=False) -> tuple[np.ndarray, np.ndarray | None]:
    """(P(foreground), P(interior) or None) float32 (H, W) for a raw uint8 RGB image (H, W, 3) of any
    size; the interior (class 1 of a boundary-target model) only when asked for."""
    x = stretch_contrast(image)
    if cfg.resize is None:
        maps = probability_maps(model, x, cfg.window, cfg.overlap, cfg.batch, device, progress, cfg.flips, interior)
    else:
        small = probability_maps(model, resize_image(x, cfg.resize), cfg.resize, 0, 1, device, flips=cfg.flips,
                                 interior=interior)
        maps = F.interpolate(torch.from_numpy(small)[None], size=image.shape[:2], mode="bilinear",
                             align_corners=False)[0].numpy()
    return maps[0], (maps[1] if interior else None)


def predict_probability(model, image: np.ndarray, cfg: InferenceConfig, device="cpu",
                        progress=False) -> np.ndarray:
    """P(foreground) float32 (H, W) for a raw uint8 RGB image (H, W, 3) of any size."""
    return predict_maps(model, image, cfg, device, progress)[0]


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


class Comparison:
    """The model's and the classical pipeline's metrics on the same images, each decoded into nuclei
    two ways: the model's `decoding` (and its 4-connected components, when the decoding is not
    those), Otsu's foreground (`otsu_side`, baseline.py) split by the untuned watershed
    (`instances.CLASSICAL`) and into its components. The decoding defaults to the components, all
    that a caller holding only the foreground mask can decode; evaluate_samples passes
    `instances.DEFAULT` and the probability (which decodings may use)."""

    def __init__(self, instances=True, decoding: Decoding = COMPONENTS, otsu_side: str = "minority"):
        self.instances, self.decoding, self.otsu_side = instances, decoding, otsu_side
        names = PIPELINES if instances else ("model", "otsu")
        if decoding.method == "components":
            names = tuple(n for n in names if n != "model_components")
        self.meters = {n: SegmentationMeter(instances) for n in names}
        self.emptied = []  # images whose foreground had blobs the decoding dropped every one of

    @property
    def model(self):
        return self.meters["model"]

    @property
    def otsu(self):
        return self.meters["otsu"]

    def update(self, pred: np.ndarray, image: np.ndarray, labels: np.ndarray, name: str, probability=None,
               instances=None, interior=None):
        """pred: the model's foreground (H, W); probability and interior: its foreground and interior
        probabilities, which the decoding may need; instances: the model's nuclei when the caller
        decoded them already (`decode(pred, probability, self.decoding, interior=interior)`). Returns
        the model's nuclei (int32 (H, W))."""
        pred = np.asarray(pred) > 0
        fg = otsu_mask(image, self.otsu_side)
        if not self.instances:
            self.meters["model"].update(pred, labels, name)
            self.meters["otsu"].update(fg, labels, name)
            return None
        if instances is None:
            instances = decode(pred, probability, self.decoding, interior=interior)
        if pred.any() and not instances.any():
            self.emptied.append(name)
        maps = {"model": instances, "otsu": decode(fg, decoding=CLASSICAL),
                "otsu_components": decode(fg, decoding=COMPONENTS)}
        if "model_components" in self.meters:
            maps["model_components"] = decode(pred, decoding=COMPONENTS)
        for n, meter in self.meters.items():
            meter.update(maps[n], labels, name)
        return instances


@torch.no_grad()
def evaluate_samples(model, samples, cfg: InferenceConfig, device="cpu", out_dir=None, overlays=0,
                     progress=True, instances=True, decoding: Decoding = DEFAULT,
                     otsu_side: str = "minority") -> Comparison:
    """Model and the classical pipeline on samples at their stored resolution (see Comparison);
    overlays of the first `overlays`."""
    from tqdm import tqdm

    comp = Comparison(instances, decoding, otsu_side)
    if out_dir and overlays:
        os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    for k, s in enumerate(tqdm(samples, desc="evaluating", leave=False, disable=not progress)):
        prob, interior = predict_maps(model, s.image, cfg, device, interior=bool(instances) and decoding.needs_interior)
        pred = prob > cfg.threshold
        nuclei = comp.update(pred, s.image, s.labels, s.id, probability=prob, interior=interior)
        if out_dir and k < overlays:  # the nuclei's foreground: the decoding may drop unsure blobs
            shown = pred if nuclei is None else nuclei > 0
            Image.fromarray(overlay(s.image, shown, s.labels, stretch=True)).save(
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


def otsu_dice(samples, side: str = "minority") -> float:
    """Otsu's foreground (`side`, baseline.py) Dice over the set: the no-learning reference for the
    validation score."""
    meter = SegmentationMeter(instances=False)
    for s in samples:
        meter.update(otsu_mask(s.image, side), s.labels, s.id)
    return meter.summary()["over_set"]["DC"]


def _difference(a: dict, b: dict) -> dict:
    return {part: {k: a[part][k] - b[part][k] for k in a[part]} for part in ("over_set", "per_image_mean")}


def _labels(comp: Comparison) -> dict:
    """Report names of the pipelines."""
    return {"model": f"model ({comp.decoding.method})", "model_components": "model, components",
            "otsu": "Otsu + watershed" if comp.instances else "Otsu", "otsu_components": "Otsu + components"}


def _table(rows: dict, part: str, points=False) -> list[str]:
    names = list(next(iter(rows.values()))[part])
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    fmt = "{:+.2f}" if points else "{:.2f}"
    for label, summary in rows.items():
        lines.append(f"| {label} | " + " | ".join(fmt.format(100 * summary[part][k]) for k in names) + " |")
    return lines


def write_report(comp: Comparison, out_dir, name="metrics", title="Test metrics", extra=None):
    """OUT/name.json and name.md: every pipeline of the comparison (the model decoded its way and as
    components, Otsu + watershed, Otsu + components) over the set and per image, and the model's
    differences to the classical pipeline. Returns the report dict."""
    os.makedirs(out_dir, exist_ok=True)
    summaries = {n: m.summary() for n, m in comp.meters.items()}
    diffs = {"model_minus_otsu": _difference(summaries["model"], summaries["otsu"])}
    if "otsu_components" in summaries:
        diffs["model_minus_otsu_components"] = _difference(summaries["model"], summaries["otsu_components"])
    per_image = [{"image": rows[0]["image"], **{n: {k: v for k, v in r.items() if k != "image"}
                                                 for n, r in zip(comp.meters, rows)}}
                 for rows in zip(*(m.per_image for m in comp.meters.values()))]
    decodings = {"model": comp.decoding.describe(), "otsu": {"side": comp.otsu_side, **CLASSICAL.describe()}}
    report = {**(extra or {}), "images": summaries["model"]["images"], "decoding": decodings, **summaries,
              **diffs, "emptied": comp.emptied,
              "note": "over_set: counts/terms summed over all images then one ratio (DSB: one ratio per IoU "
                      "threshold, then their mean); per_image_mean: mean of per-image ratios; 0/0 counts as "
                      "1. model: the model's foreground decoded into nuclei as 'decoding' says; "
                      "model_components: its 4-connected components. otsu: Otsu's threshold on the grayscale "
                      "image (foreground = decoding.otsu.side of it, no learning) split by the untuned "
                      "distance-transform watershed, which drops specks without an h-maximum as "
                      "scikit-image's does (so its Dice can sit a little below the threshold's); "
                      "otsu_components: the threshold's foreground as it is, in 4-connected components.",
              "per_image": per_image}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    labels = _labels(comp)
    rows = {labels[n]: summaries[n] for n in comp.meters}
    diff_rows = {f"model - {labels[k.removeprefix('model_minus_')]}": d for k, d in diffs.items()}
    lines = [f"## {title}", "", f"{summaries['model']['images']} images. {NOTE}", "",
             f"Nuclei of the model: {comp.decoding}. Nuclei of the classical pipeline: Otsu's threshold "
             f"({comp.otsu_side} side), {CLASSICAL} (untuned). Values in %.", ""]
    if comp.emptied:
        lines += [emptied_note(len(comp.emptied), summaries["model"]["images"]) + ": "
                  + ", ".join(comp.emptied), ""]
    for part, label in (("over_set", "Over the set"), ("per_image_mean", "Mean per image")):
        lines += [f"### {label}", ""] + _table(rows, part) + ["", f"{label}, model - Otsu (points of %):", ""]
        lines += _table(diff_rows, part, points=True) + [""]
    key = "AJI" if comp.instances else "DC"
    lines += [f"### Per image (Dice and {key} %)" if key != "DC" else "### Per image (Dice %)", "",
              "| image | Dice: model | Dice: Otsu | model - Otsu |"
              + ("".join(f" {key}: {labels[n]} |" for n in comp.meters) if key != "DC" else ""),
              "|---" * (4 + (len(comp.meters) if key != "DC" else 0)) + "|"]
    for r in per_image:
        m, o = 100 * r["model"]["DC"], 100 * r["otsu"]["DC"]
        extra_cols = "".join(f" {100 * r[n][key]:.2f} |" for n in comp.meters) if key != "DC" else ""
        lines.append(f"| {r['image']} | {m:.2f} | {o:.2f} | {m - o:+.2f} |{extra_cols}")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return report


def summary_lines(report: dict) -> list[str]:
    """The two lines the scripts print last: the model and the classical pipeline, Dice (and AJI,
    when the report has instance metrics) over the set / mean per image."""
    m, o = report["model"], report["otsu"]
    keys = ("DC", "AJI") if "AJI" in m["over_set"] else ("DC",)
    names = {"DC": "Dice", "AJI": "AJI"}

    def scores(s):
        return ", ".join(f"{names[k]} {100 * s['over_set'][k]:.2f} / {100 * s['per_image_mean'][k]:.2f}"
                         for k in keys)

    def diffs():
        return ", ".join(f"{names[k]} {100 * (m['over_set'][k] - o['over_set'][k]):+.2f} / "
                         f"{100 * (m['per_image_mean'][k] - o['per_image_mean'][k]):+.2f}" for k in keys)

    how = f", {report['decoding']['model']['method']}" if "decoding" in report else ""
    otsu_how = "Otsu + watershed, " if "AJI" in m["over_set"] else ""
    lines = [f"model: {scores(m)} (over the set / mean per image{how}) on {report['images']} images",
             f"Otsu:  {scores(o)} ({otsu_how}no learning); model - Otsu: {diffs()} points"]
    if report.get("emptied"):
        lines.append(emptied_note(len(report["emptied"]), report["images"]))
    return lines


def emptied_note(emptied: int, images: int) -> str:
    """What to say when the decoding dropped every blob of the model's foreground on some images (a
    model too unsure of its nuclei: too short a training, or images unlike its own)."""
    return (f"note: on {emptied} of {images} images the decoding dropped every blob the model found (none "
            "sure enough); --instances components keeps them")
