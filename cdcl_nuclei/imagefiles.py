"""Image and label files as nuclei tools read and write them.

Reading: PNG, JPEG and BMP through Pillow; TIFF through tifffile, which also reads 16- and 32-bit,
float and multi-page files. The model's pipeline takes uint8 RGB: an image of any other dtype is
mapped linearly from its 0.5th to its 99.5th percentile onto 0..255 (clipped), the window the model's
contrast stretch uses (`data.stretch_contrast`), so a 12- or 16-bit image keeps 256 grey levels
where its nuclei are, even when a few saturated pixels reach far above them (dividing by the
maximum would crush them into a few levels). A file with more than one plane (several pages,
channels other than RGB(A), a stack) is refused unless `channel` names the plane to read; a
file is never read as its first page silently.

Writing: label maps as uint16 PNG or TIFF, and as uint32 TIFF above 65,535 nuclei (zlib-compressed;
napari's `viewer.add_labels(tifffile.imread(path))` opens either); the foreground probability as a
float16 or uint8 TIFF.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
TIFF_EXTS = (".tif", ".tiff")
LABEL_EXTS = (".png", ".tif", ".tiff")
PROBABILITY_DTYPES = ("float16", "uint8")
PNG_MAX_LABEL = np.iinfo(np.uint16).max  # the most nuclei a 16-bit PNG label image holds


class DataError(ValueError):
    """A data file is missing, unreadable or does not match its partner."""


def check_regular(path):
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or device would block the reader
        raise DataError(f"{path}: not a regular file")


def open_image(path) -> Image.Image:
    """A Pillow image, loaded; any failure is a DataError naming the file."""
    check_regular(path)
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # PIL raises many types for truncated or foreign files
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def _is_tiff(path) -> bool:
    return os.path.splitext(str(path))[1].lower() in TIFF_EXTS


def _read_tiff(path):
    """(array, axes) of the file's one image series, e.g. 'YX', 'YXS' (samples: RGB), 'ZCYX'."""
    import tifffile

    check_regular(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series
            if len(series) != 1:
                shapes = ", ".join(str(s.shape) for s in series)
                raise DataError(f"{path}: the TIFF holds {len(series)} images of shapes {shapes}; "
                                "expected one (save the one to read on its own)")
            s = series[0]
            rgb = s.keyframe.photometric == tifffile.PHOTOMETRIC.RGB
            return s.asarray(), s.axes, rgb
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # tifffile raises several types for truncated or foreign files
        raise DataError(f"{path}: cannot read the TIFF ({type(e).__name__}: {e})") from None


def _planes(path):
    """(array, index of the axis that holds planes or None, whether those planes are RGB(A))."""
    if _is_tiff(path):
        a, axes, rgb = _read_tiff(path)
        extra = [i for i, ax in enumerate(axes) if ax not in "YX"]
        if len(extra) > 1:
            raise DataError(f"{path}: a TIFF of shape {a.shape} (axes {axes}) holds a stack of planes; "
                            "expected one image (save the plane to read on its own)")
        if not extra:
            return a, None, False
        axis = extra[0]
        return a, axis, rgb and axes[axis] == "S" and a.shape[axis] in (3, 4)
    a = np.asarray(open_image(path))
    if a.ndim == 2:
        return a, None, False
    return a, 2, a.shape[2] in (3, 4)


def to_uint8(a: np.ndarray, low=0.5, high=99.5) -> np.ndarray:
    """uint8 unchanged; any other dtype mapped from its `low`..`high` percentiles onto 0..255."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    f = a.astype(np.float64)
    lo, hi = np.percentile(f, (low, high))
    if hi <= lo:  # (nearly) constant: the full range, or black
        lo, hi = float(f.min()), float(f.max())
        if hi <= lo:
            return np.zeros(a.shape, np.uint8)
    return ((f - lo) * (255.0 / (hi - lo))).clip(0, 255).round().astype(np.uint8)


def read_image(path, channel: int | None = None) -> np.ndarray:
    """uint8 RGB (H, W, 3): grey images repeated, alpha dropped, other dtypes mapped to 8 bits (see
    the module docstring). channel: read this plane of a multi-plane file (or of an RGB image) as a
    grey image; a multi-plane file without it is a DataError."""
    a, axis, rgb = _planes(path)
    if channel is not None:
        if axis is None:
            raise DataError(f"{path}: channel {channel} asked of an image with a single plane")
        if not 0 <= channel < a.shape[axis]:
            raise DataError(f"{path}: channel {channel} asked of an image with {a.shape[axis]} planes "
                            f"(0..{a.shape[axis] - 1})")
        a, axis, rgb = np.take(a, channel, axis=axis), None, False
    if axis is not None and not rgb:
        if a.shape[axis] == 1:
            a, axis = np.take(a, 0, axis=axis), None
        elif a.shape[axis] == 2 and not _is_tiff(path):
            a, axis = np.take(a, 0, axis=axis), None  # grey + alpha (a PNG "LA")
        else:
            raise DataError(f"{path}: an image of shape {a.shape} with {a.shape[axis]} planes; choose one "
                            "with the channel argument (0-based)")
    if axis is not None:
        a = np.moveaxis(a, axis, 2)[:, :, :3]
    if a.ndim != 2 and not (a.ndim == 3 and a.shape[2] == 3):
        raise DataError(f"{path}: expected a grey or RGB(A) image, got an array of shape {a.shape}")
    a = to_uint8(a)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a)


def read_labels(path) -> np.ndarray:
    """int32 (H, W) instance map from a single-plane integer PNG or TIFF (0 = background)."""
    a = _read_tiff(path)[0] if _is_tiff(path) else np.asarray(open_image(path))
    if a.ndim != 2 or a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{path}: expected a single-channel integer instance label map, "
                        f"got {a.dtype} of shape {a.shape}")
    if a.size and (int(a.min()) < 0 or int(a.max()) > np.iinfo(np.int32).max):
        raise DataError(f"{path}: label ids must lie in 0..{np.iinfo(np.int32).max}, "
                        f"got {int(a.min())}..{int(a.max())}")
    return a.astype(np.int32)


def _check_ext(path, allowed, what):
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in allowed:
        raise ValueError(f"{what}: expected a file name ending in {', '.join(allowed)}, got {path}")
    return ext


def write_labels(path, instances: np.ndarray):
    """A label map as uint16 PNG or TIFF (by extension), or uint32 TIFF above 65,535 nuclei."""
    ext = _check_ext(path, LABEL_EXTS, "path")
    a = np.asarray(instances)
    if a.ndim != 2 or a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"instances: expected a 2-D integer instance map, got {a.dtype} of shape {a.shape}")
    lo, top = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo < 0 or top > np.iinfo(np.uint32).max:
        raise ValueError(f"instances: ids must lie in 0..{np.iinfo(np.uint32).max}, got {lo}..{top}")
    dtype = np.uint16 if top <= PNG_MAX_LABEL else np.uint32
    if ext == ".png":
        if dtype != np.uint16:
            raise ValueError(f"instances: ids up to {top} do not fit a 16-bit PNG ({path}); write a .tif, "
                             "which holds 32-bit ids")
        Image.fromarray(a.astype(np.uint16)).save(path)
        return
    import tifffile

    tifffile.imwrite(path, a.astype(dtype), compression="zlib")


def write_probability(path, probability: np.ndarray, dtype: str = "float16"):
    """The foreground probability (H, W) in [0, 1] as a TIFF: float16 (as computed, to 3 digits) or
    uint8 (255 x p, rounded)."""
    _check_ext(path, TIFF_EXTS, "path")
    if dtype not in PROBABILITY_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(PROBABILITY_DTYPES)}, got {dtype!r}")
    p = np.asarray(probability)
    if p.ndim != 2 or not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"probability: expected a 2-D float map, got {p.dtype} of shape {p.shape}")
    if p.size and not (np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1):
        raise ValueError("probability: expected finite values in [0, 1]")
    out = p.astype(np.float16) if dtype == "float16" else (p * 255.0).round().astype(np.uint8)
    import tifffile

    tifffile.imwrite(path, out, compression="zlib")
