"""A folder of images through a trained checkpoint: label masks, overlays and, where ground truth
is there, the metrics with Otsu's threshold beside the model (what `cdcl-predict` runs)."""
from __future__ import annotations

import os

from PIL import Image
from tqdm import tqdm

from . import cli, data, models
from .checkpoint import CheckpointError, load_checkpoint, load_into
from .config import PredictConfig, renamed
from .evaluate import (
    Comparison,
    inference_config,
    overlay,
    predict_probability,
    save_label_map,
    summary_lines,
    write_report,
)
from .metrics import connected_components


def gather_inputs(images_dir, labels_dir):
    """[(id, loader returning (image, labels or None))]."""
    try:
        fmt = data.detect_format(images_dir)
    except data.DataError:
        fmt = None
    if fmt is not None and labels_dir is None:
        return [(e.id, (lambda e=e: (lambda s: (s.image, s.labels))(e.load())))
                for e in data.read_folder(images_dir, fmt)]
    if not os.path.isdir(images_dir):
        raise data.DataError(f"{images_dir}: folder not found")
    names = sorted(n for n in os.listdir(images_dir) if os.path.splitext(n)[1].lower() in data.IMAGE_EXTS)
    if not names:
        raise data.DataError(f"{images_dir}: no images found")
    stems = {}
    for n in names:  # masks and overlays are named by id: two images with one id would overwrite
        stem = os.path.splitext(n)[0]
        if stem in stems:
            raise data.DataError(f"{os.path.join(images_dir, stems[stem])} and {os.path.join(images_dir, n)}: "
                                 f"two images with the id {stem!r}; rename one")
        stems[stem] = n
    out = []
    for n in names:
        stem = os.path.splitext(n)[0]
        path = os.path.join(images_dir, n)
        label_path = os.path.join(labels_dir, stem + ".png") if labels_dir else None
        if label_path and not os.path.isfile(label_path):
            raise data.DataError(f"{label_path}: label file not found for image {path}")

        def load(path=path, label_path=label_path):
            image = data.read_image(path)
            labels = data.read_labels(label_path) if label_path else None
            if labels is not None and labels.shape != image.shape[:2]:
                raise data.DataError(f"{label_path}: size does not match the image {path}")
            return image, labels
        out.append((stem, load))
    return out


def predict_folder(s: PredictConfig, names) -> None:
    """Predict every image of `s.images` into `s.out`; `names`: how errors name each setting."""
    device = cli.device(names["device"], s.device)
    cli.output_folder(names["out"], s.out)
    st = load_checkpoint(s.checkpoint, map_location=device)
    try:
        cfg = models.config_from_dict(st["config"].get("model"))
    except ValueError as e:
        raise CheckpointError(f"{s.checkpoint}: invalid model settings in the checkpoint ({e})") from None
    model = models.build_model(cfg).to(device)
    load_into(model, st["student"], s.checkpoint, "student")
    model.eval()
    given = {k: v for k, v in (("window", s.window), ("overlap", s.overlap), ("batch", s.batch),
                               ("flips", s.flips), ("threshold", s.threshold)) if v is not None}
    saved = st["config"].get("inference", {})
    try:
        inference_config(saved)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{s.checkpoint}: invalid inference settings in the checkpoint ({e})") from None
    try:
        icfg = inference_config({**saved, **given})
    except ValueError as e:  # its messages start with the field name, which is the setting's
        raise renamed(e, names) from None
    inputs = gather_inputs(s.images, s.labels)
    os.makedirs(os.path.join(s.out, "masks"), exist_ok=True)
    os.makedirs(os.path.join(s.out, "overlays"), exist_ok=True)
    comp = Comparison()
    has_gt = False
    for sid, load in tqdm(inputs, desc="predicting", disable=s.no_progress):
        image, labels = load()
        pred = predict_probability(model, image, icfg, device, progress=not s.no_progress) > icfg.threshold
        save_label_map(os.path.join(s.out, "masks", f"{sid}.{s.mask_format}"), connected_components(pred))
        Image.fromarray(overlay(image, pred, labels, stretch=True)).save(os.path.join(s.out, "overlays", f"{sid}.png"))
        if labels is not None:
            has_gt = True
            comp.update(pred, image, labels, sid)
    print(f"{len(inputs)} images -> {s.out}/masks, {s.out}/overlays")
    if has_gt:
        report = write_report(comp, s.out, "metrics", "Prediction metrics",
                              extra={"checkpoint": s.checkpoint, "images_folder": s.images})
        print(f"metrics -> {s.out}/metrics.md")
        for line in summary_lines(report):
            print(line)
