"""AJI, AJI+, PQ = SQ x DQ, F1 at IoU 0.5 and the DSB2018 score: hand-computed cases, a brute force
of the one-to-one matching, stardist's `matching` (an implementation we did not write), and the
cost of a DSB-sized evaluation."""
import itertools
import time

import numpy as np
import pytest
from scipy import ndimage

from cdcl_nuclei.instances import components
from cdcl_nuclei.metrics import DSB_THRESHOLDS, SegmentationMeter, instance_scores, instance_terms


def _merged_blob():
    """Two 2 x 2 ground-truth nuclei side by side, predicted as one 2 x 4 blob."""
    gt = np.zeros((4, 6), np.int32)
    gt[0:2, 0:2] = 1
    gt[0:2, 2:4] = 2
    pred = np.zeros((4, 6), np.int32)
    pred[0:2, 0:4] = 5
    return pred, gt


def _two_hits_and_a_false_positive():
    gt = np.zeros((10, 10), np.int32)
    gt[0:3, 0:3] = 1          # 9 pixels
    gt[5:7, 5:7] = 2          # 4 pixels
    pred = np.zeros((10, 10), np.int32)
    pred[0:3, 0:2] = 1        # 6 pixels inside gt 1: IoU 6/9
    pred[5:7, 5:7] = 2
    pred[7, 5] = 2            # gt 2 plus one pixel: IoU 4/5
    pred[9, 9] = 3            # a false positive
    return pred, gt


def test_merged_blob_by_hand():
    pred, gt = _merged_blob()
    s = instance_scores(instance_terms(pred, gt))
    # both nuclei take the blob (IoU 4/8 each): AJI = (4 + 4) / (8 + 8), the blob's area counted twice
    assert s["AJI"] == pytest.approx(0.5)
    # one-to-one: one nucleus gets the blob, the other is missed: (4) / (8 + 4)
    assert s["AJI+"] == pytest.approx(1 / 3)
    # IoU 0.5 is not above 0.5: no match, 1 FP and 2 FN
    assert s["F1"] == 0 and s["SQ"] == 0 and s["PQ"] == 0 and s["DSB"] == 0


def test_two_hits_and_a_false_positive_by_hand():
    pred, gt = _two_hits_and_a_false_positive()
    s = instance_scores(instance_terms(pred, gt))
    # AJI: (6 + 4) / (9 + 5 + 1 for the unused false positive)
    assert s["AJI"] == pytest.approx(10 / 15) and s["AJI+"] == pytest.approx(10 / 15)
    # TP 2, FP 1, FN 0: DQ = F1 = 2 / (2 + 0.5); SQ = the mean IoU of the matches
    assert s["F1"] == pytest.approx(0.8)
    assert s["SQ"] == pytest.approx((6 / 9 + 4 / 5) / 2)
    assert s["PQ"] == pytest.approx(0.8 * (6 / 9 + 4 / 5) / 2)
    # thresholds 0.5..0.65: both match, 2 / 3; 0.7 and 0.75: only IoU 0.8, 1 / (1 + 2 + 1);
    # 0.8 (not above itself) .. 0.95: none
    assert s["DSB"] == pytest.approx((4 * 2 / 3 + 2 * 1 / 4) / 10)


def test_over_the_set_sums_the_terms_by_hand():
    m = SegmentationMeter()
    ra = m.update(*_merged_blob(), "a")
    rb = m.update(*_two_hits_and_a_false_positive(), "b")
    s = m.summary()
    o = s["over_set"]
    assert o["AJI"] == pytest.approx((8 + 10) / (16 + 15))
    assert o["AJI+"] == pytest.approx((4 + 10) / (12 + 15))
    assert o["F1"] == pytest.approx(2 / (2 + 0.5 * 2 + 0.5 * 2))  # TP 2, FP 1 + 1, FN 2 + 0
    assert o["SQ"] == pytest.approx((6 / 9 + 4 / 5) / 2)
    # DSB per threshold over 4 predictions and 4 nuclei: 2 / 6 four times, 1 / 7 twice, then 0
    assert o["DSB"] == pytest.approx((4 * 2 / 6 + 2 * 1 / 7) / 10)
    for k in ("AJI", "AJI+", "PQ", "SQ", "F1", "DSB"):
        assert s["per_image_mean"][k] == pytest.approx((ra[k] + rb[k]) / 2)


def test_an_empty_prediction_and_an_empty_truth():
    gt = np.zeros((5, 5), np.int32)
    gt[1:3, 1:3] = 4
    nothing = np.zeros_like(gt)
    s = instance_scores(instance_terms(nothing, gt))
    assert all(s[k] == 0 for k in s)
    s = instance_scores(instance_terms(gt, nothing))
    assert all(s[k] == 0 for k in s)


def test_instance_maps_are_required():
    gt = np.zeros((3, 3), np.int32)
    with pytest.raises(ValueError, match="pred_instances: expected an instance map"):
        instance_terms(np.zeros((3, 3), bool), gt)
    with pytest.raises(ValueError, match="gt_instances: instance ids must be >= 0"):
        instance_terms(gt, gt - 1)
    with pytest.raises(ValueError, match="pred_instances: expected a 2-D map"):
        instance_terms(np.zeros((3, 4), np.int32), gt)
    # sparse, huge ids are ids like any other
    big = gt.copy()
    big[0, 0] = 2 ** 30
    assert instance_scores(instance_terms(big, big))["AJI"] == 1.0


def _random_pair(seed, shape=(48, 56)):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 2)
    gt = components(field > np.quantile(field, 0.5))
    noisy = ndimage.gaussian_filter(field + 0.02 * rng.standard_normal(shape), 1)
    pred = components(noisy > np.quantile(noisy, rng.uniform(0.4, 0.65)))
    pred[pred > 0] += 3 * seed  # ids need not start at 1
    return pred, gt


def _aji_plus_brute_force(pred, gt):
    """AJI+ of every one-to-one matching of maximal total IoU (ties can give several values)."""
    gts = [gt == g for g in np.unique(gt) if g]
    preds = [pred == p for p in np.unique(pred) if p]
    iou = np.array([[(a & b).sum() / (a | b).sum() for b in preds] for a in gts])
    n = max(len(gts), len(preds))
    best, values = -1.0, set()
    for perm in itertools.permutations(range(n), len(gts)):
        pairs = [(i, j) for i, j in enumerate(perm) if j < len(preds) and iou[i, j] > 0]
        total = sum(iou[i, j] for i, j in pairs)
        if total < best - 1e-12:
            continue
        c = sum((gts[i] & preds[j]).sum() for i, j in pairs)
        u = sum((gts[i] | preds[j]).sum() for i, j in pairs)
        u += sum(gts[i].sum() for i in range(len(gts)) if i not in {p[0] for p in pairs})
        u += sum(preds[j].sum() for j in range(len(preds)) if j not in {p[1] for p in pairs})
        if total > best + 1e-12:
            best, values = total, set()
        values.add(round(c / u, 12))
    return values


def _check_aji_plus(seed):
    """AJI+ of a small random case against the brute force; whether it differs from AJI there."""
    rng = np.random.default_rng(100 + seed)
    while True:  # draws with few enough nuclei for the permutations
        gt = components(rng.random((7, 8)) < 0.45)
        pred = components(ndimage.binary_dilation(rng.random((7, 8)) < 0.25))
        if max(gt.max(), pred.max()) <= 7:
            break
    s = instance_scores(instance_terms(pred, gt))
    assert round(s["AJI+"], 12) in _aji_plus_brute_force(pred, gt)
    return s["AJI+"] != s["AJI"]


def test_aji_plus_against_a_brute_force_matching():
    differs = [_check_aji_plus(seed) for seed in range(8)]
    # AJI+ differs from AJI only where a prediction is the best match of several nuclei: the cases
    # must hold such blobs for the one-to-one matching to be tested
    assert sum(differs) >= 3


@pytest.mark.parametrize("seed", range(10))
def test_against_stardist_matching(seed):
    matching = pytest.importorskip("stardist.matching").matching
    pred, gt = _random_pair(seed)
    t = instance_terms(pred, gt)
    s = instance_scores(t)
    accuracies = []
    for k, thr in enumerate(DSB_THRESHOLDS):
        # stardist matches IoU >= thresh in float32; the DSB, PQ and F1 match IoU > thresh: 1e-6
        # above the threshold is between the two for images of this size (IoU steps >= 1e-5)
        ref = matching(gt, pred, thresh=thr + 1e-6)
        assert t["tp_at"][k] == ref.tp, thr
        assert (ref.n_true, ref.n_pred) == (t["n_gt"], t["n_pred"])
        accuracies.append(ref.accuracy)  # TP / (TP + FP + FN)
        if k == 0:
            assert s["F1"] == pytest.approx(ref.f1, abs=1e-12)
            assert s["PQ"] == pytest.approx(ref.panoptic_quality, abs=1e-6)
            assert s["SQ"] == pytest.approx(ref.mean_matched_score, abs=1e-6)
    assert s["DSB"] == pytest.approx(np.mean(accuracies), abs=1e-12)


def test_a_dsb_sized_set_evaluates_in_seconds():
    """133 images of 256 x 320 with a few hundred nuclei each, as the DSB test split: the metric
    terms are vectorised (a loop only over groups of overlapping nuclei that need an assignment)."""
    pred, gt = _random_pair(0, shape=(256, 320))
    assert gt.max() > 100
    m = SegmentationMeter()
    start = time.process_time()
    for k in range(133):
        m.update(pred, gt, str(k))
    assert time.process_time() - start < 30  # about 1-2 s on a 2-core machine
