"""Nuclei data: readers for three on-disk formats and for the user's own labeled and unlabeled images,
seeded splits, MoNuSeg tiles, resizing and the labeled subset.

Formats (``detect_format`` tells them apart):
  * ``layout``  -- ``<root>/images/<id>.<ext>`` + ``<root>/labels/<id>.png`` (or ``.tif`` / ``.tiff``: an
    integer instance map), as in ``../shared/nuclei`` and the bundled ``data/dsb2018_sample``;
  * ``dsb``     -- the original DSB2018 folders ``<root>/<id>/images/<id>.png`` + ``<root>/<id>/masks/*.png``
    (one binary mask per nucleus; where masks overlap the later file name wins);
  * ``monuseg`` -- the original MoNuSeg ``<id>.tif`` images with ``<id>.xml`` polygon annotations
    (anywhere below ``root``), rasterised here.

The user's own images (``own_splits``) are folders, files or glob patterns of images; a labeled one
finds its label map in the ``labels`` folder beside its own (the layout form again), an unlabeled one
has none.

Every reader returns ``Entry`` objects that load lazily, so a split of a large set can be resized one
image at a time. Any missing, unreadable or mismatched file raises ``DataError`` naming the file.
Single files are read (TIFF, 16-bit, multi-plane) and written by ``imagefiles``.
"""
from __future__ import annotations

import glob
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# the file layer (imagefiles) under the names the scripts use: data.DataError, data.read_image, ...
from .imagefiles import (  # noqa: F401
    IMAGE_EXTS,
    LABEL_EXTS,
    DataError,
    check_regular,
    open_image,
    read_image,
    read_labels,
)


@dataclass
class Sample:
    id: str
    image: np.ndarray   # uint8 (H, W, 3)
    labels: np.ndarray | None  # int32 (H, W), 0 = background, 1..N = nuclei; None: an unlabeled image


@dataclass
class Entry:
    id: str
    load: Callable[[], Sample]
    path: str | None = None  # the image file, where one file holds it


# ---------------------------------------------------------------- files

def label_file(lab_dir, stem, image_path) -> str:
    """The label map of an image: <lab_dir>/<stem>.png, .tif or .tiff (exactly one of them)."""
    found = [p for p in (os.path.join(lab_dir, stem + ext) for ext in LABEL_EXTS) if os.path.isfile(p)]
    if not found:
        raise DataError(f"{os.path.join(lab_dir, stem + '.png')}: label file not found for image {image_path} "
                        f"(also looked for {', '.join(stem + e for e in LABEL_EXTS[1:])})")
    if len(found) > 1:
        raise DataError(f"{' and '.join(found)}: two label files for image {image_path}; keep one")
    return found[0]


def _check_same_size(image, labels, image_path, label_path):
    if image.shape[:2] != labels.shape:
        raise DataError(f"{label_path}: size {labels.shape[1]}x{labels.shape[0]} does not match the image "
                        f"{image_path} ({image.shape[1]}x{image.shape[0]})")


# ---------------------------------------------------------------- formats

def _load_layout(image_path, label_path, sid, channel=None):
    image, labels = read_image(image_path, channel), read_labels(label_path)
    _check_same_size(image, labels, image_path, label_path)
    return Sample(sid, image, labels)


def read_layout(root, channel=None) -> list[Entry]:
    img_dir, lab_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    for d in (img_dir, lab_dir):
        if not os.path.isdir(d):
            raise DataError(f"{d}: folder not found (expected <root>/images and <root>/labels)")
    entries = []
    for name in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        image_path = os.path.join(img_dir, name)
        label_path = label_file(lab_dir, stem, image_path)
        entries.append(Entry(stem, partial(_load_layout, image_path, label_path, stem, channel)))
    if not entries:
        raise DataError(f"{img_dir}: no images found")
    return entries


def _load_dsb(folder, sid, channel=None):
    image_path = os.path.join(folder, "images", sid + ".png")
    image = read_image(image_path, channel)
    mask_dir = os.path.join(folder, "masks")
    if not os.path.isdir(mask_dir):
        raise DataError(f"{mask_dir}: masks folder not found")
    labels = np.zeros(image.shape[:2], dtype=np.int32)
    names = sorted(n for n in os.listdir(mask_dir) if os.path.splitext(n)[1].lower() in IMAGE_EXTS)
    for k, name in enumerate(names, start=1):
        path = os.path.join(mask_dir, name)
        m = np.asarray(open_image(path))
        if m.ndim == 3:
            m = m[..., 0]
        if m.shape != labels.shape:
            raise DataError(f"{path}: mask size {m.shape[1]}x{m.shape[0]} does not match the image "
                            f"{image_path} ({image.shape[1]}x{image.shape[0]})")
        labels[m > 0] = k
    return Sample(sid, image, labels)


def read_dsb(root, channel=None) -> list[Entry]:
    entries = []
    for sid in sorted(os.listdir(root)):
        folder = os.path.join(root, sid)
        if not os.path.isdir(folder):
            continue
        image_path = os.path.join(folder, "images", sid + ".png")
        if not os.path.isfile(image_path):
            raise DataError(f"{image_path}: image not found (DSB2018 layout <id>/images/<id>.png)")
        entries.append(Entry(sid, partial(_load_dsb, folder, sid, channel)))
    if not entries:
        raise DataError(f"{root}: no DSB2018 sample folders found")
    return entries


def rasterize_monuseg_xml(path, height, width) -> np.ndarray:
    """Instance map from a MoNuSeg XML file: one polygon (Region/Vertices/Vertex X,Y) per nucleus."""
    check_regular(path)
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except ET.ParseError as e:
        raise DataError(f"{path}: cannot parse the XML annotation ({e})") from None
    canvas = Image.new("I", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    k = 0
    for region in tree.getroot().iter("Region"):
        try:
            pts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        except (TypeError, ValueError):
            raise DataError(f"{path}: a Vertex without numeric X and Y in Region {region.get('Id')}") from None
        if len(pts) < 3:
            continue  # a degenerate polygon has no area
        k += 1
        draw.polygon(pts, fill=k, outline=k)
    return np.asarray(canvas, dtype=np.int32).copy()


def _load_monuseg(image_path, xml_path, sid, channel=None):
    image = read_image(image_path, channel)
    labels = rasterize_monuseg_xml(xml_path, *image.shape[:2])
    return Sample(sid, image, labels)


def read_monuseg(root, channel=None) -> list[Entry]:
    images, xmls = {}, {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            stem, ext = os.path.splitext(n)
            if ext.lower() in (".tif", ".tiff"):
                images[stem] = os.path.join(dirpath, n)
            elif ext.lower() == ".xml":
                xmls[stem] = os.path.join(dirpath, n)
    if not images:
        raise DataError(f"{root}: no .tif images found")
    entries = []
    for sid in sorted(images):
        if sid not in xmls:
            raise DataError(f"{images[sid]}: no annotation file {sid}.xml found under {root}")
        entries.append(Entry(sid, partial(_load_monuseg, images[sid], xmls[sid], sid, channel)))
    return entries


def detect_format(root) -> str:
    if not os.path.isdir(root):
        raise DataError(f"{root}: data folder not found")
    if os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "labels")):
        return "layout"
    for _, _, names in os.walk(root):
        if any(n.lower().endswith(".xml") for n in names):
            return "monuseg"
    for sid in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, sid, "images")):
            return "dsb"
    raise DataError(f"{root}: not a known layout (images/+labels/, DSB2018 <id>/images+masks, "
                    "or MoNuSeg .tif+.xml)")


READERS = {"layout": read_layout, "dsb": read_dsb, "monuseg": read_monuseg}


def read_folder(root, fmt: str = "auto", channel: int | None = None) -> list[Entry]:
    """Entries of a data folder; channel: the plane read from multi-plane images (imagefiles.read_image)."""
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise ValueError(f"fmt: expected 'auto' or one of {sorted(READERS)}, got {fmt!r}")
    return READERS[fmt](root, channel)


# ---------------------------------------------------------------- the user's own images

def folder_images(folder) -> list[str]:
    """The image files directly in `folder`, sorted."""
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if os.path.splitext(n)[1].lower() in IMAGE_EXTS)


def image_paths(path) -> list[str]:
    """The image files `path` names: a folder's images, an image file, or what a glob pattern matches
    (of a folder it matches: its images). Naming none is a DataError."""
    exts = ", ".join(IMAGE_EXTS)
    if os.path.isdir(path):
        found = folder_images(path)
        if not found:
            raise DataError(f"{path}: no images found ({exts})")
        return found
    if glob.has_magic(path) and not os.path.exists(path):
        found = []
        for m in sorted(glob.glob(path)):
            if os.path.isdir(m):
                found += folder_images(m)
            elif os.path.splitext(m)[1].lower() in IMAGE_EXTS:
                found.append(m)
        if not found:
            raise DataError(f"{path}: the pattern matches no image file ({exts})")
        return found
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTS:
        raise DataError(f"{path}: not an image file (expected {exts})")
    return [path]


def _load_unlabeled(image_path, sid, channel=None):
    return Sample(sid, read_image(image_path, channel), None)


def own_images(paths, labeled: bool, channel=None) -> list[Entry]:
    """The images `paths` name (`image_paths`; of a folder holding images/, as in the layout form,
    those), each file once. A labeled image's label map is <stem>.png, .tif or .tiff in the labels
    folder beside the image's folder (<root>/images/a.png: <root>/labels/a.png), looked up now, so
    that a missing one is a DataError naming it before anything trains."""
    files = {}
    for path in paths:
        if os.path.isdir(os.path.join(path, "images")):
            path = os.path.join(path, "images")
        for f in image_paths(path):
            files.setdefault(os.path.realpath(f), f)
    entries = []
    for f in files.values():
        sid = os.path.splitext(os.path.basename(f))[0]
        if labeled:
            labels = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(f))), "labels")
            load = partial(_load_layout, f, label_file(labels, sid, f), sid, channel)
        else:
            load = partial(_load_unlabeled, f, sid, channel)
        entries.append(Entry(sid, load, f))
    return entries


def own_splits(labeled, unlabeled=(), val=(), test=(), channel=None) -> dict[str, list[Entry]]:
    """{'train', 'val', 'test', 'unlabeled'} lists of Entry of the user's images (`own_images`).

    An unlabeled file that is also named as a labeled, validation or test image is left out of the
    unlabeled set (so one folder of all the images may serve as the unlabeled set); apart from that an
    id (the file name less its extension, which names the outputs) belongs to one image of one part."""
    parts = {"train": own_images(labeled, True, channel), "val": own_images(val, True, channel),
             "test": own_images(test, True, channel)}
    named = {os.path.realpath(e.path) for entries in parts.values() for e in entries}
    parts["unlabeled"] = [e for e in own_images(unlabeled, False, channel) if os.path.realpath(e.path) not in named]
    seen = {}
    for entries in parts.values():
        for e in entries:
            if e.id in seen:
                raise DataError(f"{seen[e.id]} and {e.path}: two images with the id {e.id!r} (the id names "
                                "their outputs); rename one, or name the image once")
            seen[e.id] = e.path
    return parts


# ---------------------------------------------------------------- splits and subsets

def split_counts(n, ratios):
    total = float(sum(ratios))
    counts = [int(round(n * r / total)) for r in ratios[:-1]]
    counts.append(n - sum(counts))
    if min(counts) < 0:
        raise ValueError(f"ratios: {ratios} cannot split {n} items")
    return counts


def seeded_split(items, ratios, seed):
    """Shuffle with a seeded generator and cut by ratios (e.g. 7:1:2)."""
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for c in split_counts(len(items), ratios):
        out.append([items[i] for i in perm[start:start + c]])
        start += c
    return out


def parse_fraction(value) -> Fraction:
    try:
        f = Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"labeled_fraction: expected a fraction like 1/8 or 0.125, got {value!r}") from None
    if not 0 < f <= 1:
        raise ValueError(f"labeled_fraction: expected a value in (0, 1], got {value!r}")
    return f


def labeled_indices(n, fraction, seed):
    """Sorted indices of the labeled subset: max(1, n * fraction rounded half up) items of a seeded shuffle."""
    f = parse_fraction(fraction)
    if n == 0:
        return []
    k = max(1, math.floor(n * f + Fraction(1, 2)))  # exact, halves round up
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[:k])


VAL_SHARE = Fraction(1, 8)  # of the user's labeled images, held out for validation when none are named


def hold_out_validation(entries, seed):
    """(train, val): a seeded VAL_SHARE of `entries` (rounded half up, at least one) held out for
    validation; both keep the given order."""
    n = len(entries)
    if n < 2:
        raise ValueError(f"labeled: {n} labeled image(s): validation holds out at least one and training needs "
                         "one more; give more labeled images, or validation images of their own")
    k = max(1, math.floor(n * VAL_SHARE + Fraction(1, 2)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(perm[:k])
    return [e for i, e in enumerate(entries) if i not in val], [e for i, e in enumerate(entries) if i in val]


def dataset_splits(dataset, root, seed=0, fmt="auto", max_images=None, channel=None):
    """{'train', 'val', 'test'} lists of Entry.

    dsb: one folder split 7:1:2 by a seeded shuffle. monuseg: ``root/train`` split 80/20 (train/val)
    by whole tiles, ``root/test`` is the official test set; use ``tile_samples`` after loading.
    """
    if dataset == "dsb":
        entries = read_folder(root, fmt, channel)
        if max_images:
            entries = seeded_split(entries, (1,), seed)[0][:max_images]
        train, val, test = seeded_split(entries, (7, 1, 2), seed)
        return {"train": train, "val": val, "test": test}
    if dataset == "monuseg":
        train_all = read_folder(os.path.join(root, "train"), fmt, channel)
        test = read_folder(os.path.join(root, "test"), fmt, channel)
        if max_images:
            train_all, test = train_all[:max_images], test[:max_images]
        train, val = seeded_split(train_all, (8, 2), seed)
        return {"train": train, "val": val, "test": test}
    raise ValueError(f"dataset: expected 'dsb' or 'monuseg', got {dataset!r}")


# ---------------------------------------------------------------- tiles and resizing

def tile_sample(sample: Sample, size=250) -> list[Sample]:
    """Non-overlapping size x size crops (row-major); a remainder narrower than `size` is dropped."""
    h, w = sample.labels.shape
    if h < size or w < size:
        raise DataError(f"{sample.id}: image {w}x{h} is smaller than the {size}x{size} tile")
    return [Sample(f"{sample.id}_r{r}_c{c}", sample.image[r:r + size, c:c + size].copy(),
                   sample.labels[r:r + size, c:c + size].copy())
            for r in range(0, h - size + 1, size) for c in range(0, w - size + 1, size)]


def stretch_contrast(image: np.ndarray, low=0.5, high=99.5) -> np.ndarray:
    """Map the `low`..`high` percentiles of an image's intensities to 0..255.

    DSB2018 mixes very dim fluorescence images (nuclei at 10-40 of 255) with bright ones; without this
    a small model learns a global brightness threshold and misses the dim images entirely."""
    lo, hi = np.percentile(image, (low, high))
    if hi - lo < 1.0:
        return np.array(image)
    out = (image.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return out.clip(0, 255).round().astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size, 3): bilinear with antialiasing."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return img[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """int32 (size, size): nearest, so every id stays an id."""
    lab = torch.from_numpy(np.ascontiguousarray(labels))[None, None].float()
    return F.interpolate(lab, size=(size, size), mode="nearest-exact")[0, 0].to(torch.int32).numpy()


def training_samples(entries, tile=None, resize=None, desc="loading", progress=True) -> list[Sample]:
    """Samples ready for training crops: contrast stretched (`stretch_contrast`), at their own pixel
    scale, or resized to `resize` x `resize` (the paper's protocol) when given."""
    from tqdm import tqdm

    out = []
    for e in tqdm(entries, desc=desc, leave=False, disable=not progress or len(entries) < 50):
        s = e.load()
        for part in (tile_sample(s, tile) if tile else [s]):
            image = stretch_contrast(part.image)
            labels = part.labels
            if resize:
                image = resize_image(image, resize)
                labels = None if labels is None else resize_labels(labels, resize)
            out.append(Sample(part.id, image, labels))
    return out


def load_full(entries, tile=None):
    """Samples as stored (tiled when asked), for evaluation."""
    out = []
    for e in entries:
        s = e.load()
        out.extend(tile_sample(s, tile) if tile else [s])
    return out
