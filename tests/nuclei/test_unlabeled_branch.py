"""The unlabeled branch's levers and its log: the confidence-masked and soft consistency, the EMA of
the teacher's BatchNorm statistics, CutMix of the strong view and its targets, the pseudo-label
statistics against hidden labels, the image kinds, and the resume check of a checkpoint written
before these settings existed."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdcl_nuclei import augment, losses, schedules
from cdcl_nuclei.checkpoint import CheckpointError, check_compatible
from cdcl_nuclei.config import before_settings, resume_checked
from cdcl_nuclei.pseudo_labels import LOG_FIELDS, PseudoLabelStats, image_kind


def logits_pair(seed=0, b=2, h=5, w=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, h, w, generator=g), 3 * torch.randn(b, 2, h, w, generator=g)


def test_consistency_without_threshold_is_the_papers_cross_entropy():
    s, t = logits_pair()
    loss, kept = losses.consistency(s, t)
    assert torch.equal(loss, F.cross_entropy(s, t.argmax(dim=1)))
    assert bool(kept.all())


@pytest.mark.parametrize("threshold", [0.6, 0.9, 0.999])
def test_consistency_threshold_keeps_confident_pixels_and_averages_over_all(threshold):
    s, t = logits_pair(1)
    loss, kept = losses.consistency(s, t, threshold)
    conf, pseudo = t.softmax(dim=1).max(dim=1)
    assert torch.equal(kept, conf >= threshold)
    per_pixel = F.cross_entropy(s.double(), pseudo, reduction="none")
    want = (per_pixel * kept).sum() / per_pixel.numel()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    # gradients reach only the kept pixels
    s.requires_grad_(True)
    losses.consistency(s, t, threshold)[0].backward()
    assert bool((s.grad.abs().sum(dim=1)[~kept] == 0).all())


def test_consistency_threshold_one_keeps_nothing_and_gives_zero():
    s, t = logits_pair(2)
    t = torch.zeros_like(t)  # every pixel at probability 0.5
    loss, kept = losses.consistency(s, t, 0.9)
    assert not bool(kept.any()) and float(loss) == 0.0


def test_soft_consistency_is_the_squared_error_of_the_probabilities():
    s, t = logits_pair(3)
    loss, _ = losses.consistency(s, t, target="soft")
    want = ((s.double().softmax(1) - t.double().softmax(1)) ** 2).sum(1).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-8)
    assert float(losses.consistency(t, t, target="soft")[0]) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="target"):
        losses.consistency(s, t, 0.5, target="kl")


def bn_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))


def test_ema_of_buffers_averages_statistics_and_copies_the_counter():
    torch.manual_seed(0)
    student = bn_net()
    teacher = copy.deepcopy(student)
    student.train()
    student(torch.randn(4, 3, 5, 5) * 3 + 1)  # moves the student's running statistics
    t_mean = teacher[1].running_mean.clone()
    s_mean = student[1].running_mean.clone()
    schedules.ema_update(teacher, student, 0.9, buffers="ema")
    torch.testing.assert_close(teacher[1].running_mean, 0.9 * t_mean + 0.1 * s_mean)
    assert int(teacher[1].num_batches_tracked) == int(student[1].num_batches_tracked) == 1
    schedules.ema_update(teacher, student, 0.9)  # copy, the default
    assert torch.equal(teacher[1].running_mean, s_mean)
    with pytest.raises(ValueError, match="buffers"):
        schedules.ema_update(teacher, student, 0.9, buffers="mean")


def test_pseudo_label_stats_against_hand_counts():
    # one fluorescence crop of 2 x 2 pixels: teacher says fg, fg, bg, bg; truth fg, bg, bg, fg
    t = torch.tensor([[[[0.0, 0.0], [5.0, 5.0]], [[5.0, 5.0], [0.0, 0.0]]]])
    truth = torch.tensor([[[1, 0], [0, 3]]])
    confident = torch.tensor([[[True, False], [True, False]]])
    stats = PseudoLabelStats()
    stats.update(t, truth, ["fluorescence"], confident)
    out = stats.summary()
    assert out["pl_acc"] == 0.5 and out["pl_acc_fluorescence"] == 0.5
    assert out["pl_conf_share"] == 0.5 and out["pl_conf_acc"] == 1.0
    assert out["pl_dice"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert "pl_acc_stained" not in out  # a kind never seen is not reported
    assert set(out) <= set(LOG_FIELDS)


def test_image_kinds():
    dark = np.zeros((32, 32, 3), np.uint8)
    dark[10:20, 10:20] = 220
    light = np.full((32, 32, 3), 200, np.uint8)
    light[10:20, 10:20] = 90
    stained = np.zeros((32, 32, 3), np.uint8)
    stained[...] = (230, 170, 220)  # pink eosin background
    stained[10:20, 10:20] = (90, 40, 140)
    assert [image_kind(x) for x in (dark, light, stained)] == ["fluorescence", "brightfield", "stained"]


def test_settings_added_after_the_format_compare_as_their_before_values():
    before = before_settings()
    assert before == {"cons_threshold": 0.0, "cons_target": "hard", "teacher_bn": "eval",
                      "strong_photometric": True, "strong_cutmix": False, "bn_momentum": 0.1,
                      "labeled": None, "unlabeled": None, "val": None, "target": "binary"}
    checked = resume_checked()
    assert set(before) <= set(checked)  # they change what a run computes: never free on resume
    old = {"epochs": 10}  # a checkpoint written before these settings existed
    same = {"epochs": 10, **before}
    check_compatible("old.pt", {**before, **old}, same, {k: checked[k] for k in ("epochs", *before)})
    with pytest.raises(CheckpointError, match="--cons-threshold: checkpoint 0.0, now 0.9"):
        check_compatible("old.pt", {**before, **old}, {**same, "cons_threshold": 0.9},
                         {k: checked[k] for k in ("epochs", *before)})


@pytest.mark.parametrize("levers", [["--cons-threshold", "0.6", "--teacher-bn", "ema"],
                                    ["--cons-target", "soft", "--teacher-bn", "train", "--no-strong-photometric"],
                                    ["--strong-cutmix", "--cons-threshold", "0.6"]])
def test_a_short_run_logs_the_pseudo_labels_and_the_teachers_validation(tmp_path, levers):

    from cdcl_nuclei import cli_train
    from nuclei_scripts import SAMPLE as sample
    out = tmp_path / "run"
    n = torch.get_num_threads()
    try:
        rc = cli_train.main(["--data", str(sample), "--preset", "tiny", "--max-images", "12",
                             "--labeled-fraction", "1/4", "--batch-size", "2", "--unlabeled-batch-size", "2",
                             "--iters-per-epoch", "2", "--epochs", "2", "--unsup-start-epoch", "2", "--no-progress",
                             "--overlays", "0", "--threads", "1", "--no-test", "--method", "meanteacher",
                             "--out", str(out), *levers])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    import csv

    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["pl_acc"] == "" and rows[0]["cons_kept"] == ""  # the branch starts at epoch 2
    second = rows[1]
    assert 0.0 <= float(second["pl_acc"]) <= 1.0 and 0.0 <= float(second["pl_dice"]) <= 1.0
    assert 0.0 <= float(second["cons_kept"]) <= 1.0
    assert 0.0 <= float(second["teacher_val_dice"]) <= 1.0 and 0.0 <= float(second["val_dice"]) <= 1.0


@pytest.mark.parametrize("size,seed", [((128, 128), 0), ((96, 160), 1), ((64, 64), 2)])
def test_cutmix_boxes_are_whole_cells_and_mix_low_resolution_outputs_exactly(size, seed):
    h, w = size
    g = torch.Generator().manual_seed(seed)
    masks = augment.cutmix_masks(5, h, w, 16, g)
    assert masks.shape == (5, 1, h, w) and set(masks.unique().tolist()) <= {0.0, 1.0}
    for m in masks[:, 0]:
        rows, cols = m.any(dim=1).nonzero()[:, 0], m.any(dim=0).nonzero()[:, 0]
        assert len(rows) > 0 and len(rows) < h and len(cols) < w  # a box, never the whole crop
        assert rows[0] % 16 == 0 and (rows[-1] + 1) % 16 == 0 and cols[0] % 16 == 0 and (cols[-1] + 1) % 16 == 0
        assert bool(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all())  # one filled rectangle
        assert float(m.sum()) == len(rows) * len(cols)
    # a per-pixel map computed at stride 8 and then mixed equals the map of the mixed full-resolution input
    x = torch.randn(5, 3, h, w, generator=g)
    pooled = F.avg_pool2d(augment.cutmix(x, masks), 8)
    torch.testing.assert_close(pooled, augment.cutmix(F.avg_pool2d(x, 8), masks))
    mixed = augment.cutmix(x, masks)
    inside = masks.expand_as(x) > 0
    assert torch.equal(mixed[inside], torch.roll(x, 1, dims=0)[inside])
    assert torch.equal(mixed[~inside], x[~inside])


def test_cutmix_refuses_a_crop_without_room_for_a_box():
    with pytest.raises(ValueError, match="cutmix: a crop of 16x64"):
        augment.cutmix_masks(2, 16, 64, 16, torch.Generator().manual_seed(0))
