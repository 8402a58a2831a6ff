"""Segmentation metrics.

Pixel metrics on the binary foreground: Dice (DC), Jaccard (JC), accuracy (ACC), specificity (SP) and
sensitivity (SE).

Instance metrics of a predicted instance map against the ground-truth instance map (0 = background,
any other id one nucleus; `cdcl_nuclei.instances.decode` makes the prediction's):
  * AJI (Kumar et al. 2017): every ground-truth nucleus takes the prediction of highest IoU with it
    (a merged blob may be taken by several); the summed intersections over the summed unions, to
    which every prediction nobody took adds its area;
  * AJI+ (Graham et al. 2019): the same with a one-to-one matching of maximal total IoU, so a merged
    blob counts once and the nuclei it swallowed count as missed;
  * PQ = SQ x DQ (Kirillov et al. 2019): pairs of IoU > 0.5 match (one-to-one by construction); SQ
    is their mean IoU, DQ = TP / (TP + FP / 2 + FN / 2), which is the F1 score at IoU 0.5 (reported
    as F1);
  * DSB: the 2018 Data Science Bowl score, the mean over the IoU thresholds 0.5, 0.55, ..., 0.95 of
    TP / (TP + FP + FN) with pairs of IoU > threshold matching.

Every metric is given "over the set" (counts or terms summed over all images, then one ratio; for
DSB one ratio per threshold, then their mean) and "per image" (the ratio of each image, then the
mean). A ratio 0/0 (e.g. Dice of an image with no nuclei and no prediction) counts as 1: nothing to
find and nothing wrongly found; SQ, the mean IoU of no match, is 0 unless the image is empty too.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as graph_components

from .instances import components as connected_components  # noqa: F401  (the name tests/test_nuclei_metrics.py imports)

PIXEL_METRICS = ("DC", "JC", "ACC", "SP", "SE")
INSTANCE_METRICS = ("AJI", "AJI+", "PQ", "SQ", "F1", "DSB")
DSB_THRESHOLDS = tuple(k / 20 for k in range(10, 20))  # exactly 0.5, 0.55, ... (no arange drift)
TERMS = ("aji_c", "aji_u", "ajip_c", "ajip_u", "n_pred", "n_gt", "iou_sum", "tp_at")


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


def _compact(instances, what):
    """Ids 0..K with 0 the background and 1..K the nuclei in the order of their ids; and K."""
    a = np.asarray(instances)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}: expected an instance map of integer ids, got {a.dtype} (a foreground mask "
                         "becomes instances through cdcl_nuclei.instances.decode)")
    if a.size and a.min() < 0:
        raise ValueError(f"{what}: instance ids must be >= 0 (0 = background), got {a.min()}")
    top = int(a.max(initial=0))
    if top <= 4 * a.size + 1024:  # ids dense enough for a lookup table
        present = np.bincount(a.ravel(), minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present) * present
        return lut[a], int(present.sum())
    ids, inv = np.unique(a, return_inverse=True)
    inv = inv.reshape(a.shape)
    return (inv, len(ids) - 1) if ids[0] == 0 else (inv + 1, len(ids))


def overlaps(pred_instances, gt_instances):
    """The sparse overlap table of one image: (gt index, pred index, intersection) of every pair that
    overlaps (indices from 0, in id order), the areas of the gt and pred nuclei."""
    pred_instances, gt_instances = _check_pair(pred_instances, gt_instances, "pred_instances")
    p, n_p = _compact(pred_instances, "pred_instances")
    g, n_g = _compact(gt_instances, "gt_instances")
    area_g = np.bincount(g.ravel(), minlength=n_g + 1)[1:]
    area_p = np.bincount(p.ravel(), minlength=n_p + 1)[1:]
    both = (g > 0) & (p > 0)
    codes, inter = np.unique(g[both].astype(np.int64) * (n_p + 1) + p[both], return_counts=True)
    return codes // (n_p + 1) - 1, codes % (n_p + 1) - 1, inter, area_g, area_p


def _one_to_one(gi, pj, iou, n_g):
    """Indices (into the pairs) of the one-to-one matching of maximal total IoU: an assignment per
    connected group of overlapping nuclei (a pair alone in its group is matched as it is)."""
    if len(gi) == 0:
        return np.zeros(0, dtype=np.int64)
    n_p = int(pj.max()) + 1
    graph = coo_matrix((np.ones(len(gi)), (gi, n_g + pj)), shape=(n_g + n_p,) * 2)
    _, group = graph_components(graph, directed=False)
    pair_group = group[gi]
    order = np.argsort(pair_group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(pair_group[order]) != 0])
    sizes = np.diff(np.r_[starts, len(order)])
    keep = [order[starts[sizes == 1]]]
    for s, n in zip(starts[sizes > 1], sizes[sizes > 1]):
        idx = order[s:s + n]
        rows, r = np.unique(gi[idx], return_inverse=True)
        cols, c = np.unique(pj[idx], return_inverse=True)
        score = np.zeros((len(rows), len(cols)))
        score[r, c] = iou[idx]
        which = np.full((len(rows), len(cols)), -1, dtype=np.int64)
        which[r, c] = idx
        a, b = linear_sum_assignment(score, maximize=True)
        chosen = which[a, b]
        keep.append(chosen[chosen >= 0])
    return np.concatenate(keep)


def instance_terms(pred_instances, gt_instances):
    """The additive terms of the instance metrics for one image (summed over images for the scores
    over the set)."""
    gi, pj, inter, area_g, area_p = overlaps(pred_instances, gt_instances)
    n_g, n_p = len(area_g), len(area_p)
    inter = inter.astype(np.float64)
    union = area_g[gi] + area_p[pj] - inter
    iou = inter / union

    # AJI: each gt nucleus's best-IoU prediction (ties: the lowest pred id, as argmax)
    best = np.lexsort((pj, -iou, gi))
    best = best[np.r_[True, gi[best][1:] != gi[best][:-1]]] if len(best) else best
    taken = np.zeros(n_p, dtype=bool)
    taken[pj[best]] = True
    has_pair = np.zeros(n_g, dtype=bool)
    has_pair[gi] = True
    aji_c = float(inter[best].sum())
    aji_u = float(union[best].sum() + area_g[~has_pair].sum() + area_p[~taken].sum())

    # AJI+: one-to-one
    m = _one_to_one(gi, pj, iou, n_g)
    g_matched = np.zeros(n_g, dtype=bool)
    g_matched[gi[m]] = True
    p_matched = np.zeros(n_p, dtype=bool)
    p_matched[pj[m]] = True
    ajip_c = float(inter[m].sum())
    ajip_u = float(union[m].sum() + area_g[~g_matched].sum() + area_p[~p_matched].sum())

    # IoU > 0.5 makes the matching one-to-one without any assignment solver
    tp_at = [int(np.count_nonzero(iou > t)) for t in DSB_THRESHOLDS]
    return {"aji_c": aji_c, "aji_u": aji_u, "ajip_c": ajip_c, "ajip_u": ajip_u, "n_pred": n_p, "n_gt": n_g,
            "iou_sum": float(iou[iou > 0.5].sum()), "tp_at": tp_at}


def add_terms(a, b):
    return {k: [x + y for x, y in zip(a[k], b[k])] if k == "tp_at" else a[k] + b[k] for k in TERMS}


def instance_scores(t):
    tp = t["tp_at"][0]
    fp, fn = t["n_pred"] - tp, t["n_gt"] - tp
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn)
    sq = t["iou_sum"] / tp if tp else (1.0 if fp + fn == 0 else 0.0)
    dsb = [_ratio(k, t["n_pred"] + t["n_gt"] - k) for k in t["tp_at"]]  # TP / (TP + FP + FN)
    return {"AJI": _ratio(t["aji_c"], t["aji_u"]), "AJI+": _ratio(t["ajip_c"], t["ajip_u"]),
            "PQ": sq * dq, "SQ": sq, "F1": dq, "DSB": float(np.mean(dsb))}


class SegmentationMeter:
    """Accumulates pixel and instance metrics over a set of images."""

    def __init__(self, instances: bool = True):
        self.instances = instances
        self.counts = np.zeros(4, dtype=np.int64)
        self.terms = {k: [0] * len(DSB_THRESHOLDS) if k == "tp_at" else 0 for k in TERMS}
        self.per_image = []

    def update(self, pred, gt_instances, name: str | None = None):
        """pred: the predicted instance map (H, W), integer ids, 0 = background (a binary mask where
        `instances` is False); gt_instances: the ground-truth instance map (H, W)."""
        counts = confusion(pred, gt_instances)
        self.counts += np.asarray(counts, dtype=np.int64)
        row = {"image": name if name is not None else str(len(self.per_image)), **pixel_scores(*counts)}
        if self.instances:
            t = instance_terms(pred, gt_instances)
            self.terms = add_terms(self.terms, t)
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


NOTE = ("*Over the set*: confusion counts (pixel metrics) or matching terms (instance metrics; DSB: one "
        "ratio per IoU threshold, then their mean) summed over all images, then one ratio. *Per image*: "
        "the ratio of each image, then the mean. Pixel metrics on the binary foreground; instance "
        "metrics of the predicted nuclei against the ground-truth nuclei: AJI, AJI+ (one-to-one), "
        "PQ = SQ x DQ with DQ = F1 at IoU 0.5, DSB = mean over IoU 0.5:0.05:0.95 of TP / (TP + FP + FN).")


def markdown_table(summary, title="Test metrics"):
    names = list(summary["per_image_mean"])
    lines = [f"## {title}", "", f"{summary['images']} images. {NOTE}", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in (("over_set", "over the set"), ("per_image_mean", "mean per image")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * summary[key][k]:.2f}" for k in names) + " |")
    lines.append("")
    lines.append("Values in %.")
    return "\n".join(lines) + "\n"
