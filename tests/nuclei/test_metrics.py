import numpy as np
import pytest

from cdcl_nuclei.metrics import (
    SegmentationMeter,
    confusion,
    connected_components,
    instance_scores,
    instance_terms,
    markdown_table,
    pixel_scores,
)


def test_pixel_metrics_hand_computed():
    pred = np.array([[1, 1, 0], [0, 0, 0]])
    gt = np.array([[3, 0, 0], [3, 0, 0]])
    assert confusion(pred, gt) == (1, 1, 3, 1)
    s = pixel_scores(*confusion(pred, gt))
    assert s["DC"] == pytest.approx(0.5)
    assert s["JC"] == pytest.approx(1 / 3)
    assert s["ACC"] == pytest.approx(4 / 6)
    assert s["SP"] == pytest.approx(3 / 4)
    assert s["SE"] == pytest.approx(1 / 2)


def test_empty_image_counts_as_perfect():
    z = np.zeros((4, 5), dtype=np.int32)
    s = pixel_scores(*confusion(z, z))
    assert all(v == 1.0 for v in s.values())
    assert instance_scores(instance_terms(z, z)) == {k: 1.0 for k in ("AJI", "AJI+", "PQ", "SQ", "F1", "DSB")}


def _hand_case():
    gt = np.zeros((5, 6), dtype=np.int32)
    gt[0:2, 0:2] = 1
    gt[0:2, 4:6] = 2
    pred = np.zeros((5, 6), dtype=np.int32)
    pred[0:2, 0:2] = 1
    pred[0, 2] = 1
    pred[4, 5] = 1
    return pred, gt


def test_instance_metrics_hand_computed():
    pred, gt = _hand_case()
    inst = connected_components(pred)
    assert inst.max() == 2
    t = instance_terms(inst, gt)
    # gt 1 matches the 5-pixel component with IoU 4/5; gt 2 is missed; the lone pixel is a false positive
    tp = t["tp_at"][0]
    assert (tp, t["n_pred"] - tp, t["n_gt"] - tp) == (1, 1, 1)
    assert t["aji_c"] == 4 and t["aji_u"] == 5 + 4 + 1
    s = instance_scores(t)
    assert s["AJI"] == pytest.approx(0.4)
    assert s["PQ"] == pytest.approx(0.8 / 2)
    assert s["F1"] == pytest.approx(0.5)


def test_connected_components_are_4_connected():
    m = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    lab = connected_components(m)
    assert lab.max() == 3  # the diagonal neighbours are separate nuclei
    assert lab[1, 1] == lab[2, 1] == lab[2, 0]


def _brute_force(pred_inst, gt_inst):
    gts = [set(zip(*np.nonzero(gt_inst == g))) for g in np.unique(gt_inst) if g]
    preds = [set(zip(*np.nonzero(pred_inst == p))) for p in np.unique(pred_inst) if p]
    c = u = 0
    used = set()
    tp, iou_sum = 0, 0.0
    for g in gts:
        ious = [len(g & p) / len(g | p) for p in preds]
        if ious and max(ious) > 0:
            j = int(np.argmax(ious))
            c += len(g & preds[j])
            u += len(g | preds[j])
            used.add(j)
        else:
            u += len(g)
        for v in ious:
            if v > 0.5:
                tp += 1
                iou_sum += v
    u += sum(len(p) for j, p in enumerate(preds) if j not in used)
    fp, fn = len(preds) - tp, len(gts) - tp
    den = tp + 0.5 * fp + 0.5 * fn
    return {"AJI": c / u if u else 1.0, "PQ": iou_sum / den if den else 1.0, "F1": tp / den if den else 1.0}


@pytest.mark.parametrize("seed", range(6))
def test_instance_metrics_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 17, size=2)
    gt = connected_components(rng.random((h, w)) < 0.4)
    gt[rng.random((h, w)) < 0.1] += 50  # split some nuclei into a second id, ids need not be consecutive
    gt[gt == 50] = 0
    pred = connected_components(rng.random((h, w)) < 0.45)
    got = instance_scores(instance_terms(pred, gt))
    want = _brute_force(pred, gt)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_meter_over_set_and_per_image():
    pred1, gt1 = _hand_case()
    pred2 = np.ones((3, 3), dtype=np.int32)
    gt2 = np.zeros((3, 3), dtype=np.int32)
    gt2[0, 0] = 7
    m = SegmentationMeter()
    r1 = m.update(connected_components(pred1), gt1, "a")
    r2 = m.update(pred2, gt2, "b")
    s = m.summary()
    tp, fp, tn, fn = np.add(confusion(pred1, gt1), confusion(pred2, gt2))
    assert s["over_set"]["DC"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert s["per_image_mean"]["DC"] == pytest.approx((r1["DC"] + r2["DC"]) / 2)
    assert r2["DC"] == pytest.approx(2 / 10)
    assert s["images"] == 2
    md = markdown_table(s)
    assert "over the set" in md and "mean per image" in md and "AJI" in md


def test_meter_rejects_mismatched_shapes_and_empty_summary():
    m = SegmentationMeter()
    with pytest.raises(ValueError, match="pred"):
        m.update(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="no image"):
        m.summary()
