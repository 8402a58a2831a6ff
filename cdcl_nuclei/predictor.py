"""Images through a trained checkpoint: label images of the decoded nuclei, overlays, optionally the
foreground probability, and, where ground truth is there, the metrics with the classical pipeline
(Otsu + watershed) beside the model (what `cdcl-predict` runs)."""
from __future__ import annotations

import os

from PIL import Image
from tqdm import tqdm

from . import baseline, cli, data, imagefiles, instances, models, targets
from .checkpoint import CheckpointError, load_checkpoint, load_into
from .config import PredictConfig, check_ranges, renamed
from .evaluate import Comparison, emptied_note, inference_config, overlay, predict_maps, summary_lines, write_report


def gather_inputs(paths, labels_dir=None, channel=None):
    """[(id, loader returning (image, labels or None))] of `paths`: each a dataset folder (its images
    with their ground truth, when `labels_dir` is not given), a folder of images, an image file or a
    glob pattern. Ground truth of plain images: <labels_dir>/<id>.png, .tif or .tiff. Outputs are
    named by id, so two images with one id are refused."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out, files = [], []
    for path in map(str, paths):
        fmt = None
        if os.path.isdir(path) and labels_dir is None:
            try:
                fmt = data.detect_format(path)
            except data.DataError:
                pass
        if fmt is not None:
            out += [(e.id, os.path.join(path, e.id), (lambda e=e: (lambda s: (s.image, s.labels))(e.load())))
                    for e in data.read_folder(path, fmt, channel)]
        else:
            files += data.image_paths(path)
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        label_path = data.label_file(labels_dir, stem, path) if labels_dir else None

        def load(path=path, label_path=label_path):
            image = data.read_image(path, channel)
            labels = data.read_labels(label_path) if label_path else None
            if labels is not None and labels.shape != image.shape[:2]:
                raise data.DataError(f"{label_path}: size does not match the image {path}")
            return image, labels
        out.append((stem, os.path.normpath(path), load))
    unique = {}
    for sid, where, load in out:  # label images and overlays are named by id: one would overwrite the other
        if sid in unique and unique[sid][0] != where:
            raise data.DataError(f"{unique[sid][0]} and {where}: two images with the id {sid!r}; rename one")
        unique.setdefault(sid, (where, load))  # one file named twice (its folder and a glob): read once
    return [(sid, load) for sid, (_, load) in unique.items()]


def _reporting(s: PredictConfig, run: dict, num_classes: int):
    """(decoding, Otsu side): the flags', else the checkpoint's run's (a run before the flags existed
    decoded with the watershed and took the minority side); the watershed of the checkpoint's target
    (a run before --target existed trained the binary one)."""
    choice = {}
    for key, options, default in (("instances", instances.INSTANCES, "watershed"),
                                  ("otsu_side", baseline.SIDES, "minority"), ("target", targets.TARGETS, "binary")):
        value = getattr(s, key, None) or run.get(key, default)
        if value not in options:
            raise CheckpointError(f"{s.checkpoint}: invalid {key} in the checkpoint's settings: {value!r}")
        choice[key] = value
    want = targets.NUM_CLASSES[choice["target"]]
    if want != num_classes:
        raise CheckpointError(f"{s.checkpoint}: the {choice['target']} target has {want} classes, but the "
                              f"checkpoint's model predicts {num_classes}")
    return instances.for_target(choice["instances"], choice["target"]), choice["otsu_side"]


def predict_folder(s: PredictConfig, names) -> None:
    """Predict every image of `s.images` into `s.out`; `names`: how errors name each setting."""
    check_ranges(s, names)
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
    decoding, otsu_side = _reporting(s, st["config"], cfg.num_classes)
    inputs = gather_inputs(s.images, s.labels, s.channel)
    folders = ["masks", "overlays"] + (["probabilities"] if s.save_probabilities else [])
    for name in folders:
        os.makedirs(os.path.join(s.out, name), exist_ok=True)
    comp = Comparison(decoding=decoding, otsu_side=otsu_side)
    has_gt, emptied = False, 0
    for sid, load in tqdm(inputs, desc="predicting", disable=s.no_progress):
        image, labels = load()
        prob, interior = predict_maps(model, image, icfg, device, progress=not s.no_progress,
                                      interior=decoding.needs_interior)
        pred = prob > icfg.threshold
        nuclei = instances.decode(pred, prob, decoding, interior=interior)
        emptied += bool(pred.any() and not nuclei.any())
        if s.label_format == "png" and int(nuclei.max(initial=0)) > imagefiles.PNG_MAX_LABEL:
            raise ValueError(f"{names['label_format']}: {sid} has {int(nuclei.max())} nuclei, more than a 16-bit "
                             "PNG holds; use --label-format tif (32-bit ids)")
        imagefiles.write_labels(os.path.join(s.out, "masks", f"{sid}.{s.label_format}"), nuclei)
        if s.save_probabilities:
            imagefiles.write_probability(os.path.join(s.out, "probabilities", f"{sid}.tif"), prob,
                                         s.probability_dtype)
        # the nuclei's foreground: the decoding may drop unsure blobs
        Image.fromarray(overlay(image, nuclei > 0, labels, stretch=True)).save(
            os.path.join(s.out, "overlays", f"{sid}.png"))
        if labels is not None:
            has_gt = True
            comp.update(pred, image, labels, sid, probability=prob, instances=nuclei, interior=interior)
    print(f"{len(inputs)} images -> " + ", ".join(f"{s.out}/{name}" for name in folders))
    if emptied and not has_gt:  # with ground truth the report's last lines say it
        print(emptied_note(emptied, len(inputs)))
    if has_gt:
        report = write_report(comp, s.out, "metrics", "Prediction metrics",
                              extra={"checkpoint": s.checkpoint, "inputs": list(s.images)})
        print(f"metrics -> {s.out}/metrics.md")
        for line in summary_lines(report):
            print(line)
