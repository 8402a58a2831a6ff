"""Nuclei as instances: the predicted foreground split into nuclei.

Two decodings of a binary foreground (``Decoding.method``):
  * ``components``: its 4-connected components (touching nuclei stay one);
  * ``watershed``: each component flooded from markers on a relief, so touching nuclei that each
    form a dome of the relief become separate instances. The relief (``surface``) is the Euclidean
    distance to the background or the foreground probability, smoothed by a Gaussian of ``sigma``
    pixels; the markers are its h-maxima (domes at least ``h`` high: pixels for the distance, a
    probability for the probability) or the 4-connected regions where the probability exceeds
    ``marker_threshold``. A component without a marker (too small or too flat to hold one) stays one
    nucleus (``unmarked="keep"``) or is dropped (``"drop"``: what scikit-image's watershed does with
    a mask, so what its users get: specks vanish). Independently of the markers, ``min_peak`` drops
    every component whose highest foreground probability does not exceed it: the specks a model
    barely believes (hundreds of them on unfamiliar images) vanish, while a model sure of a nucleus
    only below a marker threshold still finds it.

A model trained on the boundary target (targets.py: background / interior / boundary) is decoded
from its interiors (``markers="interior"``): the markers are the 8-connected regions where the
interior probability exceeds ``marker_threshold``, those under ``min_marker`` pixels dropped (a
speck of interior inside a boundary band would split a nucleus), then grown: first by the ring of
pixels that touch one marker only (the target's boundary is that one-pixel ring), then over the
relief into the foreground. The target's interiors of two nuclei never touch, even diagonally, so
that decoding grows, floods and takes components over 8 neighbours, and a perfect prediction decodes
back into its instance map (tested).

Components, and the watershed that keeps unmarked components, only split: the union of the instances
is exactly the foreground, so the pixel metrics do not depend on the decoding. The surface is defined
on the whole image; markers are taken
per component (the surface outside it counts as 0, so a neighbour's dome never decides whether this
component's dome is a marker), and the flooding stays inside its component. That makes the decoding
local: it runs over groups of components (those whose bounding box starts in one block of
``block`` x ``block`` pixels) on crops just large enough for the smoothed distance to be exact, and
gives the same partition as one pass over the whole image while its temporaries stay the size of a
crop (about 9 bytes per pixel of the image are kept: the mask, its components and the output).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

METHODS = ("watershed", "components")
SURFACES = ("distance", "probability")
MARKERS = ("h_maxima", "threshold", "interior")
UNMARKED = ("keep", "drop")
# 4-connectivity, except for interior markers (see the module docstring): nuclei that touch only at
# a corner are separate, as in the components
CROSS = ndimage.generate_binary_structure(2, 1)
SQUARE = ndimage.generate_binary_structure(2, 2)
TRUNCATE = 4.0  # scipy's gaussian_filter default: the kernel reaches int(4 sigma + 0.5) pixels


@dataclass(frozen=True)
class Decoding:
    """How a foreground becomes instances (see the module docstring)."""
    method: str = "watershed"
    surface: str = "distance"
    markers: str = "h_maxima"
    sigma: float = 1.0
    h: float = 2.0
    marker_threshold: float = 0.9
    min_marker: int = 1  # markers of fewer pixels are dropped (1: none is)
    unmarked: str = "keep"
    min_peak: float = 0.0  # components whose highest probability does not exceed it are dropped (0: none)

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("surface", SURFACES), ("markers", MARKERS),
                              ("unmarked", UNMARKED)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma: expected a finite value >= 0, got {self.sigma}")
        if not (self.h > 0 and math.isfinite(self.h)):
            raise ValueError(f"h: expected a finite value > 0, got {self.h}")
        if not 0.0 < self.marker_threshold < 1.0:  # also refuses NaN
            raise ValueError(f"marker_threshold: expected a probability in (0, 1), got {self.marker_threshold}")
        if isinstance(self.min_marker, bool) or not isinstance(self.min_marker, int) or self.min_marker < 1:
            raise ValueError(f"min_marker: expected an integer >= 1, got {self.min_marker!r}")
        if not 0.0 <= self.min_peak < 1.0:  # also refuses NaN
            raise ValueError(f"min_peak: expected a probability in [0, 1), got {self.min_peak}")

    @property
    def needs_probability(self) -> bool:
        return self.method == "watershed" and (self.surface == "probability" or self.markers == "threshold"
                                               or self.min_peak > 0)

    @property
    def keeps_every_component(self) -> bool:
        """Whether every component of the foreground becomes at least one nucleus (none is dropped),
        so the nuclei cover the foreground exactly."""
        return self.method == "components" or (self.unmarked == "keep" and self.min_peak == 0)

    @property
    def needs_interior(self) -> bool:
        """Whether it decodes the interior probability of a boundary-target model (targets.py)."""
        return self.method == "watershed" and self.markers == "interior"

    def __str__(self) -> str:
        if self.method == "components":
            return "4-connected components"
        markers = {"h_maxima": f"h-maxima (h {self.h:g})", "threshold": f"probability > {self.marker_threshold:g}",
                   "interior": f"interior probability > {self.marker_threshold:g}, 8-connected"}[self.markers]
        if self.min_marker > 1:
            markers += f", at least {self.min_marker} pixels"
        unmarked = "dropped" if self.unmarked == "drop" else "kept whole"
        faint = f"; components never above probability {self.min_peak:g} dropped" if self.min_peak > 0 else ""
        return (f"watershed on the {self.surface} (Gaussian sigma {self.sigma:g}), markers: {markers}, "
                f"components without a marker {unmarked}{faint}")

    def describe(self) -> dict:
        """The fields that matter for this method (what reports record)."""
        if self.method == "components":
            return {"method": "components"}
        d = asdict(self)
        d.pop("marker_threshold" if self.markers == "h_maxima" else "h")
        if self.min_marker == 1:
            d.pop("min_marker")
        if self.min_peak == 0:
            d.pop("min_peak")
        return d


COMPONENTS = Decoding(method="components")
# the classical pipeline's split, untuned: what a CellProfiler, Fiji or scikit-image user runs on
# Otsu's foreground (a component without an h-maximum stays background, as skimage's watershed leaves it)
CLASSICAL = Decoding(method="watershed", surface="distance", markers="h_maxima", sigma=1.0, h=2.0,
                     unmarked="drop")
# the model's decoding in reports and predictions, chosen on validation splits only
# (experiments/choose_decoding.py, experiments/results/instances/choice.md: the best mean goal over the
# demo's 90-epoch models and the CPU Table 1's DSB 1/32 CDCL models): the classical split of the
# model's foreground with lower domes (h 0.5) as markers, less the blobs the model never believed
# above 0.8 (specks: hundreds per image on unfamiliar images). The model's probability as relief or
# markers (the choice of 2026-12-04, on one demo model) scored 5-8 points lower on the weak 1/32 models.
DEFAULT = Decoding(method="watershed", surface="distance", markers="h_maxima", sigma=1.0, h=0.5, unmarked="keep",
                   min_peak=0.8)
# the decoding of a boundary-target model (not tuned yet: experiments/boundary_target.sh compares it on
# validation): its interiors where the model puts them first (above 1/2, so the argmax is interior),
# specks of 1-2 pixels ignored, grown over the foreground probability; a blob without an interior
# (a nucleus too small to have one) is kept whole
BOUNDARY = Decoding(method="watershed", surface="probability", markers="interior", sigma=1.0,
                    marker_threshold=0.5, min_marker=3, unmarked="keep")
# the decodings the commands offer (--instances), by name: the watershed depends on the model's target
INSTANCES = ("watershed", "components")
WATERSHED_OF_TARGET = {"binary": DEFAULT, "boundary": BOUNDARY}


def for_target(instances: str, target: str) -> Decoding:
    """The decoding `--instances` names for a model trained on `target` (targets.TARGETS)."""
    if instances not in INSTANCES:
        raise ValueError(f"instances: expected one of {', '.join(INSTANCES)}, got {instances!r}")
    if target not in WATERSHED_OF_TARGET:
        raise ValueError(f"target: expected one of {', '.join(WATERSHED_OF_TARGET)}, got {target!r}")
    return COMPONENTS if instances == "components" else WATERSHED_OF_TARGET[target]


def components(mask, structure=CROSS) -> np.ndarray:
    """int32 (H, W) ids 1..K of the 4-connected (`structure`) components of mask > 0, in raster order."""
    labels, _ = ndimage.label(np.asarray(mask) > 0, structure=structure, output=np.int32)
    return labels


def _checked_map(name, a, shape):
    if a is None:
        return None
    a = np.asarray(a)
    if a.shape != shape:
        raise ValueError(f"{name}: expected the mask's shape {shape}, got {a.shape}")
    return a


def decode(mask, probability=None, decoding: Decoding = CLASSICAL, block: int = 1024, interior=None) -> np.ndarray:
    """int32 (H, W) instance map of the foreground `mask` (0 = background, 1..K = nuclei).

    probability: float (H, W) foreground probability; needed when the decoding uses it (the
    probability surface or threshold markers). interior: float (H, W) interior probability of a
    boundary-target model; needed by interior markers. block: the side of the blocks that group
    components for the local passes (memory, not results)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask: expected a 2-D foreground, got shape {mask.shape}")
    mask = mask > 0
    probability = _checked_map("probability", probability, mask.shape)
    interior = _checked_map("interior", interior, mask.shape)
    if probability is None and decoding.needs_probability:
        raise ValueError(f"probability: the decoding {decoding.describe()} needs the foreground probability")
    if interior is None and decoding.needs_interior:
        raise ValueError(f"interior: the decoding {decoding.describe()} needs the interior probability of a "
                         "boundary-target model")
    if block < 1:
        raise ValueError(f"block: expected >= 1, got {block}")
    if decoding.method == "components":
        return components(mask)
    return _watershed(mask, probability, interior, decoding, block)


def _watershed(mask, probability, interior, d: Decoding, block):
    from skimage.segmentation import watershed

    structure = SQUARE if d.needs_interior else CROSS
    labels = components(mask, structure)
    n = int(labels.max(initial=0))
    out = np.zeros(mask.shape, dtype=np.int32)
    if n == 0:
        return out
    boxes = ndimage.find_objects(labels)
    lo = np.array([(b[0].start, b[1].start) for b in boxes])
    hi = np.array([(b[0].stop, b[1].stop) for b in boxes])
    # a component's distances are exact on its box padded by 1; a neighbour's, within the Gaussian's
    # reach r of it, lie within 2r more (a background pixel separates the two): 3r + 1 keeps the
    # smoothed surface on the component exactly what the whole image gives
    reach = int(TRUNCATE * d.sigma + 0.5) if d.sigma > 0 else 0
    pad = 3 * reach + 1
    cell = (lo[:, 0] // block) * (mask.shape[1] // block + 1) + lo[:, 1] // block
    order = np.argsort(cell, kind="stable")
    cuts = np.flatnonzero(np.diff(cell[order])) + 1
    chosen = np.zeros(n + 1, dtype=bool)
    next_id = 0
    for group in np.split(order, cuts):
        r0, c0 = np.maximum(lo[group].min(0) - pad, 0)
        r1, c1 = np.minimum(hi[group].max(0) + pad, mask.shape)
        window = (slice(r0, r1), slice(c0, c1))
        if d.min_peak > 0:  # components never above it are dropped (each lies whole in the window)
            group = group[np.asarray(ndimage.maximum(probability[window], labels[window], group + 1)) > d.min_peak]
            if len(group) == 0:
                continue
        chosen[group + 1] = True
        inside = chosen[labels[window]]
        chosen[group + 1] = False
        relief = _surface(mask[window], None if probability is None else probability[window], d)
        relief[~inside] = 0.0
        seeds = _markers(relief, None if probability is None else probability[window],
                         None if interior is None else interior[window], inside, d, structure)
        flooded = watershed(-relief, seeds, mask=inside, connectivity=2 if d.needs_interior else 1)
        if d.unmarked == "keep":  # a component without a marker: its component id, after the markers'
            alone = inside & (flooded == 0)
            flooded[alone] = labels[window][alone] + int(seeds.max(initial=0))
        ids, inverse = np.unique(flooded[inside], return_inverse=True)
        unflooded = ids[0] == 0  # dropped components: they stay background
        new = inverse.astype(np.int32) + (next_id + 1 - unflooded)
        if unflooded:
            new[inverse == 0] = 0
        out[window][inside] = new
        next_id += len(ids) - unflooded
    return out


def _surface(fg, probability, d: Decoding):
    if d.surface == "distance":
        s = ndimage.distance_transform_edt(fg)
    else:
        s = probability.astype(np.float64)
    if d.sigma > 0:
        s = ndimage.gaussian_filter(s, d.sigma, truncate=TRUNCATE)
    return s


def _markers(relief, probability, interior, inside, d: Decoding, structure):
    if d.markers == "h_maxima":
        from skimage.morphology import h_maxima

        seeds = h_maxima(relief, d.h, footprint=CROSS).astype(bool)
    elif d.markers == "threshold":
        seeds = probability > d.marker_threshold
    else:
        seeds = interior > d.marker_threshold
    seeds &= inside
    labels, _ = ndimage.label(seeds, structure=structure, output=np.int32)
    if d.min_marker > 1:
        small = np.bincount(labels.ravel()) < d.min_marker
        small[0] = False
        labels[small[labels]] = 0
    if d.markers == "interior":
        # the target's boundary is the one-pixel ring around each interior: a pixel beside one
        # interior only is that nucleus's, whatever the relief says (the flooding would take it from
        # whichever front arrives first, and a neighbour's front runs ahead where the relief is higher)
        none = np.iinfo(np.int32).max
        high = ndimage.maximum_filter(labels, footprint=SQUARE, mode="constant", cval=0)
        low = ndimage.minimum_filter(np.where(labels > 0, labels, none), footprint=SQUARE, mode="constant", cval=none)
        ring = inside & (labels == 0) & (high > 0) & (high == low)
        labels[ring] = high[ring]
    return labels
