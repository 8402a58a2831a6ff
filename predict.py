"""Segment a folder of images with a trained checkpoint.

    python predict.py --checkpoint runs/demo/best.pt --images some/folder --out runs/pred
    python predict.py --checkpoint runs/demo/best.pt --images data/dsb2018_sample --out runs/pred

--images is either a plain folder of images (.png/.tif/.jpg) or a dataset folder (images/ + labels/,
DSB2018 <id>/images + masks, MoNuSeg .tif + .xml); with ground truth (found there or given by --labels,
a folder of <id>.png instance maps) the overlays show prediction green, ground truth red and their
overlap yellow (the paper's Figure 3), and metrics.json / metrics.md are written, with Otsu's
threshold on the same images beside the model. Without ground truth
the overlays show the prediction in green. Label masks (uint16 instance maps, one id per 4-connected
component of the predicted foreground) go to OUT/masks/<id>.png (or .tif with --mask-format tif).
Images of any size are predicted at native resolution over overlapping, blended windows (the window
and overlap of the checkpoint's run unless given here); a checkpoint of a --resize run resizes as
it was trained.
"""
from __future__ import annotations

import argparse
import os
import sys

from PIL import Image
from tqdm import tqdm

from cdcl_nuclei import cli, data, models
from cdcl_nuclei.checkpoint import CheckpointError, load_checkpoint, load_into
from cdcl_nuclei.evaluate import (
    Comparison,
    inference_config,
    overlay,
    predict_probability,
    save_label_map,
    summary_lines,
    write_report,
)
from cdcl_nuclei.metrics import connected_components


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, help="folder of images or a dataset folder")
    p.add_argument("--labels", default=None, help="folder of <id>.png ground-truth instance maps")
    p.add_argument("--out", required=True)
    p.add_argument("--mask-format", default="png", choices=("png", "tif"))
    p.add_argument("--threshold", type=float, default=None, help="foreground probability threshold "
                   "(default: the checkpoint's, 0.5)")
    p.add_argument("--window", type=int, default=None, help="inference window side (multiple of 32)")
    p.add_argument("--overlap", type=int, default=None, help="overlap of neighbouring windows, pixels")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--flips", action=argparse.BooleanOptionalAction, default=None,
                   help="average the four flips of each window (default: as the checkpoint's run)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


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


def main(argv=None):
    args = parse_args(argv)
    try:
        device = cli.device("--device", args.device)
        cli.output_folder("--out", args.out)
        st = load_checkpoint(args.checkpoint, map_location=device)
        try:
            cfg = models.config_from_dict(st["config"].get("model"))
        except ValueError as e:
            raise CheckpointError(f"{args.checkpoint}: invalid model settings in the checkpoint ({e})") from None
        model = models.build_model(cfg).to(device)
        load_into(model, st["student"], args.checkpoint, "student")
        model.eval()
        given = {k: v for k, v in (("window", args.window), ("overlap", args.overlap), ("batch", args.batch),
                                   ("flips", args.flips), ("threshold", args.threshold)) if v is not None}
        saved = st["config"].get("inference", {})
        try:
            inference_config(saved)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{args.checkpoint}: invalid inference settings in the checkpoint ({e})") from None
        try:
            icfg = inference_config({**saved, **given})
        except ValueError as e:  # its messages start with the field name, which is the flag's
            raise ValueError(f"--{e}") from None
        inputs = gather_inputs(args.images, args.labels)
        os.makedirs(os.path.join(args.out, "masks"), exist_ok=True)
        os.makedirs(os.path.join(args.out, "overlays"), exist_ok=True)
        comp = Comparison()
        has_gt = False
        for sid, load in tqdm(inputs, desc="predicting", disable=args.no_progress):
            image, labels = load()
            pred = predict_probability(model, image, icfg, device, progress=not args.no_progress) > icfg.threshold
            save_label_map(os.path.join(args.out, "masks", f"{sid}.{args.mask_format}"), connected_components(pred))
            Image.fromarray(overlay(image, pred, labels, stretch=True)).save(
                os.path.join(args.out, "overlays", f"{sid}.png"))
            if labels is not None:
                has_gt = True
                comp.update(pred, image, labels, sid)
        print(f"{len(inputs)} images -> {args.out}/masks, {args.out}/overlays")
        if has_gt:
            report = write_report(comp, args.out, "metrics", "Prediction metrics",
                                  extra={"checkpoint": args.checkpoint, "images_folder": args.images})
            print(f"metrics -> {args.out}/metrics.md")
            for line in summary_lines(report):
                print(line)
    except (CheckpointError, data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
