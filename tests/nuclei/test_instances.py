"""Nuclei as instances: the watershed and components decodings, the decoding of a boundary-target
model's interiors, the classical pipeline, and the decoding of a 4000 x 4000 prediction in bounded
memory."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from cdcl_nuclei import baseline, instances, targets
from cdcl_nuclei.instances import BOUNDARY, CLASSICAL, COMPONENTS, DEFAULT, Decoding, components, decode


def _discs(shape, centres, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return [(yy - r) ** 2 + (xx - c) ** 2 <= radius ** 2 for r, c in centres]


def _dome_probability(shape, centres, radius):
    """A probability that peaks at each centre and falls to 0.5 at the radius (a trained model's
    foreground looks like this: surest in the middle of a nucleus, least sure at its edge)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    d = np.min([np.hypot(yy - r, xx - c) for r, c in centres], axis=0)
    return np.clip(1.0 - 0.5 * d / radius, 0.0, 1.0).astype(np.float32)


def _partition(a):
    """The partition of the pixels an instance map makes, as a set of frozensets of flat indices
    (equal for two maps that differ only by their ids)."""
    return {frozenset(np.flatnonzero(a == k).tolist()) for k in np.unique(a) if k}


DECODINGS = [CLASSICAL, DEFAULT, Decoding(surface="probability", h=0.1, sigma=1.0),
             Decoding(surface="probability", markers="threshold", marker_threshold=0.95, unmarked="drop"),
             Decoding(surface="probability", markers="threshold", marker_threshold=0.95, min_peak=0.7),
             Decoding(markers="threshold", marker_threshold=0.8),
             Decoding(surface="probability", markers="threshold", sigma=0.0, marker_threshold=0.9)]


@pytest.mark.parametrize("decoding", DECODINGS, ids=lambda d: "-".join(map(str, d.describe().values())))
def test_watershed_splits_two_touching_discs_and_keeps_one_whole(decoding):
    shape, radius = (60, 96), 14
    a, b = _discs(shape, [(30, 30), (30, 56)], radius)  # centres 26 apart: the discs overlap by 3 pixels
    prob = _dome_probability(shape, [(30, 30), (30, 56)], radius)
    fg = a | b
    assert components(fg).max() == 1  # one blob for the components
    inst = decode(fg, prob, decoding)
    assert inst.dtype == np.int32 and np.array_equal(inst > 0, fg)  # the split never changes the foreground
    assert inst.max() == 2
    # each disc's own pixels (away from the neck) are one nucleus, and not the other disc's
    left, right = a & ~b, b & ~a
    assert len(np.unique(inst[left])) == 1 and len(np.unique(inst[right])) == 1
    assert inst[30, 30] != inst[30, 56]
    # a single disc stays whole
    (single,) = _discs(shape, [(30, 40)], radius)
    one = decode(single, _dome_probability(shape, [(30, 40)], radius), decoding)
    assert one.max() == 1 and np.array_equal(one > 0, single)


def test_components_are_4_connected_and_match_the_old_decoding():
    m = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    lab = decode(m, decoding=COMPONENTS)
    assert lab.max() == 3  # diagonal neighbours are separate nuclei
    assert lab[1, 1] == lab[2, 1] == lab[2, 0]
    rng = np.random.default_rng(0)
    r = rng.random((40, 50)) < 0.5
    want, _ = ndimage.label(r)  # scipy's default structure is the 4-neighbourhood
    assert np.array_equal(decode(r, decoding=COMPONENTS), want)


@pytest.mark.parametrize("decoding", DECODINGS + [Decoding(unmarked="drop", h=1.0)],
                         ids=lambda d: "-".join(map(str, d.describe().values())))
def test_blockwise_decoding_equals_one_pass_over_the_image(decoding):
    rng = np.random.default_rng(3)
    field = ndimage.gaussian_filter(rng.random((180, 230)), 3)
    # blobs with sure cores (above 0.95) and others without: both kinds of component occur
    prob = np.clip(2.5 * (field - field.min()) / (field.max() - field.min()) - 0.65, 0, 1).astype(np.float32)
    fg = prob > 0.5
    whole = decode(fg, prob, decoding, block=10 ** 6)
    assert whole.max() > components(fg).max()  # the test image has something to split
    for block in (16, 41):
        part = decode(fg, prob, decoding, block=block)
        assert _partition(part) == _partition(whole)
        assert sorted(np.unique(part)) == list(range(part.max() + 1))  # ids 1..K, none skipped


def _touching_nuclei(shape=(72, 96)):
    """An instance map of touching nuclei: two discs cut by the line halfway between their centres,
    two squares side by side and two offset ones, a disc that touches a square only at a corner, a
    lone disc and a lone 3 x 3 nucleus (one interior pixel)."""
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    centres = [(14, 14), (14, 30)]
    d = np.stack([np.hypot(yy - r, xx - c) for r, c in centres])
    inside = d.min(0) <= 9
    labels[inside] = 1 + d.argmin(0)[inside]
    labels[4:12, 46:54], labels[4:12, 54:62] = 3, 4
    labels[30:38, 4:12], labels[34:42, 12:20] = 5, 6
    labels[44:52, 20:28] = 7
    (corner,) = _discs(shape, [(55, 31)], 4.5)  # its pixel (52, 28) meets the square's (51, 27) diagonally
    labels[corner & (labels == 0)] = 8
    (lone,) = _discs(shape, [(50, 70)], 8)
    labels[lone] = 9
    labels[64:67, 88:91] = 10
    return labels


def _perfect_prediction(labels):
    """(foreground, interior) probabilities of a model that predicts the boundary target exactly."""
    t = targets.boundary_target(torch.from_numpy(labels)[None])[0].numpy()
    return (t != targets.BACKGROUND).astype(np.float32), (t == targets.INTERIOR).astype(np.float32)


@pytest.mark.parametrize("decoding", [BOUNDARY, Decoding(surface="distance", markers="interior", marker_threshold=0.5,
                                                         min_marker=3),
                                      Decoding(surface="probability", markers="interior", sigma=0.0,
                                               marker_threshold=0.5)],
                         ids=lambda d: "-".join(map(str, d.describe().values())))
def test_boundary_decoding_of_a_perfect_prediction_gives_back_the_instance_map(decoding):
    labels = _touching_nuclei()
    assert components(labels > 0).max() == 7  # three pairs of touching nuclei are single blobs
    fg, interior = _perfect_prediction(labels)
    got = decode(fg > 0.5, fg, decoding, interior=interior)
    # every nucleus comes back, the 3 x 3 one too: its one interior pixel is a marker, or below
    # min_marker it is a component without a marker, kept whole
    assert _partition(got) == _partition(labels)


def test_interior_markers_below_the_minimum_size_are_dropped():
    labels = np.zeros((12, 20), np.int32)
    labels[2:9, 2:9], labels[2:9, 9:16] = 1, 2  # touching 7 x 7 squares: 5 x 5 interiors
    fg, interior = _perfect_prediction(labels)
    interior[3:8, 10:15] = 0.0  # the right interior shrunk to a one-pixel speck
    interior[5, 12] = 1.0

    def decoded(min_marker):
        d = Decoding(surface="probability", markers="interior", marker_threshold=0.5, min_marker=min_marker)
        return decode(fg > 0.5, fg, d, interior=interior)
    assert decoded(1).max() == 2
    merged = decoded(2)
    assert merged.max() == 1 and np.array_equal(merged > 0, labels > 0)  # the left interior floods both


def test_blockwise_boundary_decoding_equals_one_pass_over_the_image():
    rng = np.random.default_rng(5)
    field = ndimage.gaussian_filter(rng.random((180, 230)), 3)
    fg = np.clip(2.5 * (field - field.min()) / (field.max() - field.min()) - 0.65, 0, 1).astype(np.float32)
    interior = np.clip(2.0 * fg - 1.0, 0, 1)  # cores of the blobs, a few of them several per blob
    whole = decode(fg > 0.3, fg, BOUNDARY, block=10 ** 6, interior=interior)
    assert whole.max() > components(fg > 0.3, instances.SQUARE).max()  # something to split
    for block in (16, 41):
        part = decode(fg > 0.3, fg, BOUNDARY, block=block, interior=interior)
        assert _partition(part) == _partition(whole)
        assert sorted(np.unique(part)) == list(range(part.max() + 1))


def test_the_watershed_follows_the_models_target():
    assert set(instances.WATERSHED_OF_TARGET) == set(targets.TARGETS)
    assert instances.for_target("watershed", "binary") is DEFAULT and not DEFAULT.needs_interior
    assert instances.for_target("watershed", "boundary") is BOUNDARY and BOUNDARY.needs_interior
    assert instances.for_target("components", "boundary") is COMPONENTS
    with pytest.raises(ValueError, match="^instances:"):
        instances.for_target("blobs", "binary")
    with pytest.raises(ValueError, match="^target:"):
        instances.for_target("watershed", "edges")
    assert BOUNDARY.describe() == {"method": "watershed", "surface": "probability", "markers": "interior",
                                   "sigma": 1.0, "marker_threshold": 0.5, "min_marker": 3, "unmarked": "keep"}
    assert "interior probability > 0.5" in str(BOUNDARY) and "at least 3 pixels" in str(BOUNDARY)


def test_unmarked_components_are_kept_whole_or_dropped():
    shape = (40, 60)
    (disc,) = _discs(shape, [(20, 20)], 10)
    fg = disc.copy()
    fg[5:7, 50:52] = True  # a 2 x 2 speck: its smoothed distance never rises 2 pixels
    keep = decode(fg, decoding=Decoding(unmarked="keep"))
    drop = decode(fg, decoding=CLASSICAL)
    assert CLASSICAL.unmarked == "drop"
    assert keep.max() == 2 and np.array_equal(keep > 0, fg)
    assert drop.max() == 1 and np.array_equal(drop > 0, disc)


def test_min_peak_drops_the_components_the_model_was_never_fairly_sure_of():
    shape = (40, 90)
    discs = _discs(shape, [(20, 15), (20, 45), (20, 75)], 8)
    fg = np.logical_or.reduce(discs)
    prob = np.zeros(shape)
    for disc, peak in zip(discs, (0.99, 0.85, 0.6)):  # sure (a marker), fairly sure, barely
        prob[disc] = peak
    rule = dict(surface="probability", markers="threshold", marker_threshold=0.95)
    kept = decode(fg, prob, Decoding(**rule, unmarked="keep", min_peak=0.7))
    assert kept.max() == 2 and np.array_equal(kept > 0, discs[0] | discs[1])
    assert np.array_equal(decode(fg, prob, Decoding(**rule, unmarked="keep")) > 0, fg)
    assert np.array_equal(decode(fg, prob, Decoding(**rule, unmarked="drop")) > 0, discs[0])
    # a peak exactly at min_peak is not above it; the same partition whatever the blocks
    assert decode(fg, prob, Decoding(**rule, unmarked="keep", min_peak=0.85)).max() == 1
    assert np.array_equal(decode(fg, prob, Decoding(**rule, unmarked="keep", min_peak=0.7), block=16), kept)
    # whatever the markers: a disc with a dome of the distance but no probability above 0.7 is dropped
    with_distance = Decoding(unmarked="keep", h=0.5, min_peak=0.7)
    assert decode(fg, prob, Decoding(unmarked="keep", h=0.5)).max() == 3
    assert np.array_equal(decode(fg, prob, with_distance), kept)
    assert np.array_equal(decode(fg, prob, with_distance, block=16), kept)
    assert decode(fg, prob, Decoding(unmarked="keep", h=0.5, min_peak=0.99)).max() == 0  # none: all dropped
    # it needs the probability even where the relief and the markers do not
    assert with_distance.needs_probability and with_distance.describe()["min_peak"] == 0.7
    assert "never above probability 0.7 dropped" in str(with_distance) and "min_peak" not in Decoding().describe()
    assert not with_distance.keeps_every_component and not CLASSICAL.keeps_every_component
    assert Decoding(unmarked="keep").keeps_every_component and COMPONENTS.keeps_every_component
    with pytest.raises(ValueError, match="^probability:"):
        decode(fg, None, with_distance)


def test_empty_and_full_foregrounds():
    z = np.zeros((7, 9), bool)
    assert decode(z).max() == 0 and decode(z, decoding=COMPONENTS).max() == 0
    full = decode(np.ones((7, 9), bool))
    assert full.min() == 1 and full.max() == 1  # one flat-topped blob, one nucleus


def test_decoding_checks_name_the_argument():
    for bad, name in ((dict(method="blobs"), "method"), (dict(surface="edges"), "surface"),
                      (dict(markers="peaks"), "markers"), (dict(sigma=-1), "sigma"),
                      (dict(sigma=float("nan")), "sigma"), (dict(h=0), "h"),
                      (dict(marker_threshold=1.0), "marker_threshold"),
                      (dict(marker_threshold=float("nan")), "marker_threshold"), (dict(unmarked="no"), "unmarked"),
                      (dict(min_marker=0), "min_marker"), (dict(min_marker=2.5), "min_marker"),
                      (dict(min_marker=True), "min_marker"), (dict(min_peak=1.0), "min_peak"),
                      (dict(min_peak=float("nan")), "min_peak"), (dict(min_peak=-0.1), "min_peak")):
        with pytest.raises(ValueError, match=f"^{name}:"):
            Decoding(**bad)
    fg = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="^probability:"):
        decode(fg, None, Decoding(surface="probability", h=0.1))
    with pytest.raises(ValueError, match="^probability:"):
        decode(fg, np.ones((4, 5)), CLASSICAL)
    with pytest.raises(ValueError, match="^mask:"):
        decode(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="^block:"):
        decode(fg, block=0)
    with pytest.raises(ValueError, match="^interior:"):
        decode(fg, np.ones((4, 4)), BOUNDARY)
    with pytest.raises(ValueError, match="^interior:"):
        decode(fg, np.ones((4, 4)), BOUNDARY, interior=np.ones((5, 4)))
    assert COMPONENTS.describe() == {"method": "components"}
    assert "marker_threshold" not in CLASSICAL.describe() and CLASSICAL.describe()["h"] == 2.0


def test_classical_pipeline_splits_touching_bright_nuclei():
    shape = (64, 100)
    a, b = _discs(shape, [(32, 32), (32, 58)], 14)
    image = np.full(shape + (3,), 20, np.uint8)
    image[a | b] = 200
    ws = baseline.classical_instances(image, "watershed")
    cc = baseline.classical_instances(image, "components")
    assert ws.max() == 2 and cc.max() == 1
    assert np.array_equal(ws > 0, a | b) and np.array_equal(cc > 0, a | b)
    # the dark side picks the dark nuclei of a bright stain, as the minority side does here
    assert np.array_equal(baseline.classical_instances(255 - image, "watershed", side="dark") > 0, a | b)
    with pytest.raises(ValueError, match="^method:"):
        baseline.classical_instances(image, "blobs")
    with pytest.raises(ValueError, match="^side:"):
        baseline.otsu_mask(image, "left")


def test_otsu_sides():
    img = np.full((20, 20, 3), 30, np.uint8)
    img[5:9, 5:9] = 220
    bright = baseline.otsu_mask(img, "bright")
    assert np.array_equal(baseline.otsu_mask(img, "minority"), bright)
    assert np.array_equal(baseline.otsu_mask(img, "dark"), ~bright)
    assert np.array_equal(baseline.otsu_mask(255 - img, "minority"), bright)


def test_large_prediction_decodes_in_bounded_memory():
    """4000 x 4000 pixels of touching nucleus pairs (31,250 nuclei): the peak of extra memory stays
    near the maps the decoding keeps (mask, components, output: 9 bytes a pixel); one skimage pass
    over the whole image would take about ten times that."""
    code = (
        "import numpy as np, resource\n"
        "from cdcl_nuclei.instances import decode, DEFAULT\n"
        "n = 4000\n"
        "yy, xx = np.mgrid[:32, :32]\n"
        "r = np.minimum(np.hypot(yy - 16, xx - 9), np.hypot(yy - 16, xx - 23))\n"
        "tile = np.clip(1.2 - r / 8, 0, 1).astype(np.float32)\n"
        "prob = np.tile(tile, (n // 32 + 1, n // 32 + 1))[:n, :n].copy()\n"
        "mask = prob > 0.3\n"
        "decode(mask[:64, :64], prob[:64, :64], DEFAULT)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = decode(mask, prob, DEFAULT)\n"
        "extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024\n"
        "print(int(out.max()), (out[mask] > 0).all(), (out[~mask] == 0).all(), extra)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    count, covered, clean, extra = r.stdout.split()
    assert int(count) == 2 * (4000 // 32) ** 2  # every pair split
    assert covered == "True" and clean == "True"
    assert int(extra) < 16 * 4000 * 4000, int(extra) / 4000 ** 2
