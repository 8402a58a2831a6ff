"""Segmentation metrics.

Pixel metrics on the binary foreground: Dice (DC), Jaccard (JC), accuracy (ACC), specificity (SP) and
sensitivity (SE), both "over the set" (confusion counts summed over all images, then one ratio) and
"per image" (one ratio per image, then the mean). A ratio 0/0 (e.g. Dice of an image with no nuclei
and no prediction) counts as 1: nothing to find and nothing wrongly found.

Instance metrics: predicted instances are the 4-connected components of the predicted foreground;
ground-truth instances are the ids of the instance map. AJI (Kumar et al. 2017), PQ (Kirillov et al.
2019) and F1 of the one-to-one matching at IoU > 0.5, per image (mean) and over the set (summed
terms).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

PIXEL_METRICS = ("DC", "JC", "ACC", "SP", "SE")
INSTANCE_METRICS = ("AJI", "PQ", "F1")


def _ratio(num, den):
    return 1.0 if den == 0 else float(num) / float(den)


def _check_pair(pred, gt, what="pred"):
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D map of the ground truth's shape {gt.shape}, got {pred.shape}")
    return pred, gt


def confusion(pred, gt):
    """(TP, FP, TN, FN) of the binary foregrounds pred > 0 and gt > 0."""
    pred, gt = _check_pair(pred, gt)
    p, g = pred > 0, gt > 0
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p & ~g))
    fn = int(np.count_nonzero(~p & g))
    return tp, fp, p.size - tp - fp - fn, fn


def pixel_scores(tp, fp, tn, fn):
    return {"DC": _ratio(2 * tp, 2 * tp + fp + fn), "JC": _ratio(tp, tp + fp + fn),
            "ACC": _ratio(tp + tn, tp + fp + tn + fn), "SP": _ratio(tn, tn + fp), "SE": _ratio(tp, tp + fn)}


def connected_components(mask):
    """Instance map (int32, 0 = background) of the 4-connected components of mask > 0."""
    labels, _ = ndimage.label(np.asarray(mask) > 0)
    return labels.astype(np.int32)


def _relabel(instances):
    """Consecutive ids 1..K (0 stays background) and K."""
    ids, inv = np.unique(np.asarray(instances), return_inverse=True)
    inv = inv.reshape(np.shape(instances))
    if ids[0] == 0:
        return inv, len(ids) - 1
    return inv + 1, len(ids)


def instance_terms(pred_instances, gt_instances):
    """The additive terms of AJI / PQ / F1 for one image."""
    pred_instances, gt_instances = _check_pair(pred_instances, gt_instances, "pred_instances")
    p, n_p = _relabel(pred_instances)
    g, n_g = _relabel(gt_instances)
    inter = np.bincount((g.ravel() * (n_p + 1) + p.ravel()).astype(np.int64),
                        minlength=(n_g + 1) * (n_p + 1)).reshape(n_g + 1, n_p + 1)
    area_g = inter.sum(1)[1:]
    area_p = inter.sum(0)[1:]
    inter = inter[1:, 1:].astype(np.float64)
    union = area_g[:, None] + area_p[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

    # AJI: every ground-truth nucleus takes its best-IoU prediction (which may be shared); the
    # predictions nobody took add their whole area to the union.
    c = u = 0.0
    used = np.zeros(n_p, dtype=bool)
    for k in range(n_g):
        if n_p and iou[k].max() > 0:
            j = int(iou[k].argmax())
            c += inter[k, j]
            u += union[k, j]
            used[j] = True
        else:
            u += area_g[k]
    u += float(area_p[~used].sum())

    # IoU > 0.5 makes the matching one-to-one without any assignment solver.
    matched = iou > 0.5
    tp = int(matched.sum())
    return {"aji_c": c, "aji_u": u, "tp": tp, "fp": n_p - tp, "fn": n_g - tp,
            "iou_sum": float(iou[matched].sum())}


def instance_scores(t):
    pq_den = t["tp"] + 0.5 * t["fp"] + 0.5 * t["fn"]
    return {"AJI": _ratio(t["aji_c"], t["aji_u"]),
            "PQ": _ratio(t["iou_sum"], pq_den),
            "F1": _ratio(t["tp"], pq_den)}


class SegmentationMeter:
    """Accumulates pixel and instance metrics over a set of images."""

    def __init__(self, instances: bool = True):
        self.instances = instances
        self.counts = np.zeros(4, dtype=np.int64)
        self.terms = {"aji_c": 0.0, "aji_u": 0.0, "tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0}
        self.per_image = []

    def update(self, pred_mask, gt_instances, name: str | None = None):
        """pred_mask: binary prediction (H, W); gt_instances: instance map (H, W), 0 = background."""
        counts = confusion(pred_mask, gt_instances)
        self.counts += np.asarray(counts, dtype=np.int64)
        row = {"image": name if name is not None else str(len(self.per_image)), **pixel_scores(*counts)}
        if self.instances:
            t = instance_terms(connected_components(pred_mask), gt_instances)
            for k in self.terms:
                self.terms[k] += t[k]
            row.update(instance_scores(t))
        self.per_image.append(row)
        return row

    def summary(self):
        if not self.per_image:
            raise ValueError("SegmentationMeter: no image was added")
        names = PIXEL_METRICS + (INSTANCE_METRICS if self.instances else ())
        over_set = pixel_scores(*self.counts.tolist())
        if self.instances:
            over_set.update(instance_scores(self.terms))
        mean = {k: float(np.mean([r[k] for r in self.per_image])) for k in names}
        return {"images": len(self.per_image), "over_set": over_set, "per_image_mean": mean}


def markdown_table(summary, title="Test metrics"):
    names = list(summary["per_image_mean"])
    lines = [f"## {title}", "",
             f"{summary['images']} images. *Over the set*: confusion counts (pixel metrics) or matching "
             "terms (AJI, PQ, F1) summed over all images, then one ratio. *Per image*: the ratio of each "
             "image, then the mean. Pixel metrics on the binary foreground; instance metrics from the "
             "4-connected components of the prediction against the ground-truth instances.", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in (("over_set", "over the set"), ("per_image_mean", "mean per image")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * summary[key][k]:.2f}" for k in names) + " |")
    lines.append("")
    lines.append("Values in %.")
    return "\n".join(lines) + "\n"
