"""The boundary target (--target boundary): the three-class target of an instance map, the reduction
of three classes to nucleus-vs-background for L_contr and the pseudo-label log, the semi-supervised
terms on three classes, the labeled batches of a run, a short run that tests and predicts without
repeating the target, the checkpoints whose target does not fit their model, and the comparison
script of the two targets (experiments/boundary_target.py)."""
import csv
import json

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from cdcl_nuclei import augment, cli_predict, cli_train, config, crops, instances, losses, models, targets
from cdcl_nuclei.checkpoint import load_checkpoint, save_checkpoint
from cdcl_nuclei.evaluate import InferenceConfig, inference_config, predict_maps
from cdcl_nuclei.imagefiles import read_labels
from cdcl_nuclei.pseudo_labels import PseudoLabelStats
from cdcl_nuclei.trainer import Trainer
from cdcl_ops import CrossPatchInfoNCE
from cdcl_ops.cross_patch import pseudo_labels
from nuclei_scripts import SAMPLE, TINY, one_thread  # noqa: F401 (autouse fixture)

BG, IN, BD = targets.BACKGROUND, targets.INTERIOR, targets.BOUNDARY


def _target(labels):
    return targets.boundary_target(torch.as_tensor(np.asarray(labels))[None])[0].numpy()


def _square(out, rows, cols):
    """Paint the target of a lone square nucleus: its outer ring boundary, the rest interior."""
    out[rows[0]:rows[1], cols[0]:cols[1]] = BD
    out[rows[0] + 1:rows[1] - 1, cols[0] + 1:cols[1] - 1] = IN


def test_target_of_two_touching_squares_and_a_lone_one():
    labels = np.zeros((16, 24), np.int32)
    labels[2:8, 2:8], labels[2:8, 8:14] = 1, 2  # touching along columns 7 | 8
    labels[9:14, 16:21] = 7
    want = np.zeros_like(labels)
    for rows, cols in (((2, 8), (2, 8)), ((2, 8), (8, 14)), ((9, 14), (16, 21))):
        _square(want, rows, cols)
    got = _target(labels)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    assert (got[2:8, 7] == BD).all() and (got[2:8, 8] == BD).all()  # where they touch
    assert (got[3:7, 3:7] == IN).all() and (got[3:7, 9:13] == IN).all()  # inside


def test_target_boundary_against_another_nucleus_and_not_at_the_crop_edge():
    labels = np.ones((10, 10), np.int32)  # a nucleus filling the crop, another one inside it
    labels[3:7, 3:7] = 2
    got = _target(labels)
    want = np.full_like(labels, IN)  # the crop's edge is no boundary: the nucleus may go on beyond it
    want[2:8, 2:8] = BD  # nucleus 1 around nucleus 2, and nucleus 2's ring: no background anywhere
    want[4:6, 4:6] = IN
    np.testing.assert_array_equal(got, want)
    # a diagonal neighbour of another label is enough
    diag = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 2]])
    assert _target(diag)[2, 2] == BD and _target(diag)[1, 1] == IN


def test_target_is_a_3x3_min_max_filter_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(5):
        # blobs of a few ids, touching each other and the background
        labels = ndimage.zoom(rng.integers(0, 5, size=(6, 8)), 5, order=0)[:27, :37].astype(np.int32)
        low = ndimage.minimum_filter(labels, size=3, mode="nearest")
        high = ndimage.maximum_filter(labels, size=3, mode="nearest")
        want = np.where(labels == 0, BG, np.where(low != high, BD, IN))
        np.testing.assert_array_equal(_target(labels), want)
    batch = torch.from_numpy(np.stack([labels, labels[::-1].copy()]))
    both = targets.boundary_target(batch)
    np.testing.assert_array_equal(both[1].numpy(), _target(labels[::-1].copy()))


def test_targets_and_their_errors():
    labels = torch.tensor([[[0, 3, 3], [0, 3, 3]]], dtype=torch.int32)
    assert targets.make_target(labels, "binary").tolist() == [[[0, 1, 1], [0, 1, 1]]]
    # the last column touches only its nucleus and the crop's edge
    assert targets.make_target(labels, "boundary").tolist() == [[[0, 2, 1], [0, 2, 1]]]
    assert targets.NUM_CLASSES == {"binary": 2, "boundary": 3} and set(targets.NUM_CLASSES) == set(targets.TARGETS)
    with pytest.raises(ValueError, match="^target:"):
        targets.make_target(labels, "edges")
    with pytest.raises(ValueError, match="^labels:"):
        targets.boundary_target(labels[0])
    with pytest.raises(ValueError, match="^labels:"):
        targets.boundary_target(labels.float())


def test_three_classes_reduce_to_nucleus_against_background():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    two = targets.foreground_logits(logits)
    p = logits.softmax(1)
    assert two.shape == (2, 2, 8, 8)
    torch.testing.assert_close(two.softmax(1), torch.stack([p[:, 0], p[:, 1] + p[:, 2]], 1))
    # the pseudo labels of L_contr: interior and boundary pixels are one class (1), whichever of
    # the two the argmax picks
    labels = pseudo_labels(two, 2, 8, 8, "student_pred")
    assert torch.equal(labels, (p[:, 0] < 0.5).long())
    assert bool((labels[p.argmax(1) == IN] == 1).all()) and bool((labels[p.argmax(1) == BD] == 1).all())
    # at the features' stride: the pooled foreground probability against the pooled background's
    pooled = pseudo_labels(two, 2, 4, 4, "student_pred")
    assert torch.equal(pooled, (F.avg_pool2d(p[:, :1], 2)[:, 0] < 0.5).long())
    binary = torch.randn(2, 2, 4, 4)
    assert targets.foreground_logits(binary) is binary  # a binary run computes exactly what it did
    # the pseudo-label log takes the reduction, never the three classes (where argmax > 0 would miss
    # the pixels whose nucleus probability is split between interior and boundary)
    with pytest.raises(ValueError, match="^teacher_logits:"):
        PseudoLabelStats().update(logits, torch.zeros(2, 8, 8), ["fluorescence"] * 2, torch.ones(2, 8, 8, dtype=bool))
    split = torch.tensor([0.4, 0.3, 0.3]).log().view(1, 3, 1, 1)  # nucleus 0.6, argmax background
    stats = PseudoLabelStats()
    stats.update(targets.foreground_logits(split), torch.ones(1, 1, 1, dtype=torch.int32), ["fluorescence"],
                 torch.ones(1, 1, 1, dtype=bool))
    assert stats.summary()["pl_acc"] == 1.0
    with pytest.raises(ValueError, match="^logits:"):
        targets.foreground_logits(torch.randn(2, 1, 4, 4))


def test_consistency_and_entropy_on_three_classes():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, 7, generator=g), 3 * torch.randn(2, 3, 5, 7, generator=g)
    loss, kept = losses.consistency(s, t)
    assert torch.equal(loss, F.cross_entropy(s, t.argmax(1))) and bool(kept.all())
    loss, kept = losses.consistency(s, t, 0.8)
    conf, pseudo = t.softmax(1).max(1)
    torch.testing.assert_close(loss, (F.cross_entropy(s, pseudo, reduction="none") * (conf >= 0.8)).mean())
    soft, _ = losses.consistency(s, t, target="soft")
    torch.testing.assert_close(soft, (s.softmax(1) - t.softmax(1)).pow(2).sum(1).mean())
    assert float(losses.entropy(torch.zeros(1, 3, 2, 2))) == pytest.approx(np.log(3), abs=1e-6)
    assert float(losses.entropy(torch.tensor([[[[40.0]], [[0.0]], [[0.0]]]]))) < 1e-6
    # the soft Dice of L_sup reads the foreground of either target
    y = torch.tensor([[[0, 1], [2, 0]]])
    perfect = F.one_hot(y, 3).permute(0, 3, 1, 2).float() * 40 - 20
    assert float(losses.soft_dice_loss(perfect, y)) < 1e-6


def _trainer(tmp_path, *flags):
    run = config.resolve_training(*config.parse(config.TrainConfig, TINY + ["--out", str(tmp_path), *flags]))
    return Trainer(run, 1, 0, torch.device("cpu"))


def _interior_surrounded(y):
    """Whether every interior pixel of the class maps y (B, H, W) has no background among its 8 neighbours."""
    fg = F.pad((y > 0).float()[:, None], (1, 1, 1, 1), mode="replicate")
    all_around = -F.max_pool2d(-fg, 3, stride=1)[:, 0] > 0
    return bool(all_around[y == IN].all())


def test_labeled_batches_take_the_target_of_the_warped_crop(tmp_path):
    """The target is made after the geometric augmentation: every interior pixel of every labeled
    crop has nucleus all around it, which the nearest-sampled warp of a target made before it
    (rotated, zoomed) does not keep."""
    boundary = _trainer(tmp_path / "a", "--target", "boundary", "--method", "suponly")
    binary = _trainer(tmp_path / "b", "--method", "suponly")
    assert boundary.student.cfg.num_classes == 3 and binary.student.cfg.num_classes == 2
    g, h, k = (torch.Generator().manual_seed(3) for _ in range(3))
    idx = boundary.d["labeled"][:2]
    before = []
    for _ in range(4):
        _, y = boundary.batch(idx, g, True)
        _, yb = binary.batch(idx, h, True)
        assert torch.equal(yb, (y > 0).long())  # the same crops, the same nuclei
        assert _interior_surrounded(y) and bool((y == IN).any()) and bool((y == BD).any())
        x, labels = crops.random_crops(boundary.d["train"], idx, 64, k)
        theta = augment.sample_geometry(len(idx), boundary.aug, k)
        before.append(_interior_surrounded(augment.warp(augment.to_float(x), theta,
                                                        targets.boundary_target(labels))[1]))
    assert not all(before)


def _rows(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def test_a_short_boundary_run_tests_and_predicts_without_repeating_the_target(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    seen = []  # the classes of the predictions L_contr gets
    contrast = CrossPatchInfoNCE.forward

    def spy(self, student_feats, teacher_feats, student_pred, teacher_pred, **kw):
        seen.append((student_pred.shape[1], teacher_pred.shape[1]))
        return contrast(self, student_feats, teacher_feats, student_pred, teacher_pred, **kw)
    monkeypatch.setattr(CrossPatchInfoNCE, "forward", spy)
    assert cli_train.main(TINY + ["--method", "cdcl", "--target", "boundary", "--epochs", "2",
                                  "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 2
    for r in rows:  # every unlabeled term ran, on three classes; L_contr on nucleus against background
        for k in ("sup", "cons", "contr", "ent", "query_share", "pl_acc", "pl_dice"):
            assert np.isfinite(float(r[k])), (k, r[k])
    assert seen == [(2, 2)] * 4  # 2 epochs x 2 steps
    st = load_checkpoint(out / "best.pt")
    assert st["config"]["target"] == "boundary" and st["config"]["model"]["num_classes"] == 3
    assert st["student"]["classifier.4.weight"].shape[0] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decoding"]["model"] == instances.BOUNDARY.describe()
    test_ids = json.loads((out / "splits.json").read_text())["test"]

    # predict.py on the test images, without --target: the checkpoint says it
    pout = tmp_path / "pred"
    pin = tmp_path / "pin"
    (pin / "images").mkdir(parents=True)
    (pin / "labels").mkdir()
    for sid in test_ids:
        for d in ("images", "labels"):
            (pin / d / f"{sid}.png").write_bytes((SAMPLE / d / f"{sid}.png").read_bytes())
    assert cli_predict.main(["--checkpoint", str(out / "best.pt"), "--out", str(pout), "--save-probabilities",
                             "--no-progress", str(pin)]) == 0
    pm = json.loads((pout / "metrics.json").read_text())
    assert pm["decoding"] == metrics["decoding"]
    for name in ("model", "model_components", "otsu", "otsu_components"):
        for part in ("over_set", "per_image_mean"):
            assert pm[name][part] == pytest.approx(metrics[name][part], abs=1e-12), name
    # the label images are the interiors of the model grown into its foreground
    model = models.build_model(models.config_from_dict(st["config"]["model"])).eval()
    model.load_state_dict(st["student"])
    icfg = inference_config(st["config"]["inference"])
    for sid in test_ids:
        image = np.asarray(Image.open(SAMPLE / "images" / f"{sid}.png").convert("RGB"))
        fg, interior = predict_maps(model, image, icfg, interior=True)
        want = instances.decode(fg > icfg.threshold, fg, instances.BOUNDARY, interior=interior)
        np.testing.assert_array_equal(read_labels(pout / "masks" / f"{sid}.png"), want)
        # the saved probability is the foreground's, 1 - P(background)
        np.testing.assert_allclose(tifffile.imread(pout / "probabilities" / f"{sid}.tif"), fg, atol=1e-3)
        assert (interior <= fg + 1e-6).all()  # the interior is part of the foreground
    # --instances components still works: the components of the foreground
    pcomp = tmp_path / "pred-components"
    assert cli_predict.main(["--checkpoint", str(out / "best.pt"), "--out", str(pcomp), "--instances", "components",
                             "--no-progress", str(pin)]) == 0
    pc = json.loads((pcomp / "metrics.json").read_text())
    assert pc["decoding"]["model"] == {"method": "components"}
    for part in ("over_set", "per_image_mean"):
        assert pc["model"][part] == pytest.approx(metrics["model_components"][part], abs=1e-12)

    # the target is part of what a resumed run must keep
    assert cli_train.main(TINY + ["--method", "cdcl", "--epochs", "2", "--out", str(out),
                                  "--resume", str(out / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--target: checkpoint 'boundary', now 'binary'" in err, err


def _untrained_checkpoint(path, num_classes, target=None, sharpen=1.0):
    """An untrained tiny model as a checkpoint; `sharpen` scales its last layer, so that its classes
    vary across an image instead of all sitting near 1 / num_classes."""
    torch.manual_seed(0)
    cfg = models.model_config("tiny", num_classes=num_classes)
    model = models.build_model(cfg).eval()
    with torch.no_grad():
        model.classifier[-1].weight *= sharpen
    run = {"model": models.asdict(cfg), "inference": {"window": 64, "overlap": 16, "flips": False}}
    if target is not None:
        run["target"] = target
    save_checkpoint(path, {"epoch": 1, "step": 1, "run_id": "r", "student": model.state_dict(), "config": run})
    return model


def _crop(folder):
    folder.mkdir(parents=True)
    p = sorted((SAMPLE / "images").iterdir())[0]
    Image.fromarray(np.asarray(Image.open(p).convert("RGB"))[:96, :128]).save(folder / f"{p.stem}.png")
    return p.stem


def test_a_checkpoint_whose_target_does_not_fit_its_model_is_refused(tmp_path, capsys):
    _crop(tmp_path / "in")
    for classes, target in ((2, "boundary"), (3, "binary"), (3, None)):
        ckpt = tmp_path / f"c{classes}{target}.pt"
        _untrained_checkpoint(ckpt, classes, target)
        assert cli_predict.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--no-progress",
                                 str(tmp_path / "in")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ckpt.name in err and f"predicts {classes}" in err, err
    # the interior of a two-class model does not exist
    model = _untrained_checkpoint(tmp_path / "b.pt", 2)
    with pytest.raises(ValueError, match="^interior:"):
        predict_maps(model, np.zeros((40, 40, 3), np.uint8), InferenceConfig(window=64, overlap=16), interior=True)


def test_a_boundary_checkpoint_predicts_its_interiors_grown(tmp_path):
    """What the short run above cannot show (its model calls everything nucleus): label images of a
    model whose interiors split its foreground, predicted without --target."""
    sid = _crop(tmp_path / "in")
    model = _untrained_checkpoint(tmp_path / "c.pt", 3, "boundary", sharpen=10.0)
    assert cli_predict.main(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "o"), "--no-progress",
                             str(tmp_path / "in")]) == 0
    image = np.asarray(Image.open(tmp_path / "in" / f"{sid}.png"))
    fg, interior = predict_maps(model, image, InferenceConfig(window=64, overlap=16, flips=False), interior=True)
    want = instances.decode(fg > 0.5, fg, instances.BOUNDARY, interior=interior)
    np.testing.assert_array_equal(read_labels(tmp_path / "o" / "masks" / f"{sid}.png"), want)
    assert want.max() > instances.decode(fg > 0.5, decoding=instances.COMPONENTS).max() > 1  # blobs, split


def test_the_comparison_script_scores_the_validation_split_of_finished_runs(tmp_path):
    from experiments import boundary_target

    runs = tmp_path / "runs"
    for target in ("binary", "boundary"):
        out = runs / f"{target}-seed0"
        assert cli_train.main(TINY + ["--method", "suponly", "--target", target, "--epochs", "1", "--no-test",
                                      "--overlays", "0", "--out", str(out)]) == 0
        (out / "done").touch()
    (runs / "boundary-seed1").mkdir()  # unfinished: left out
    assert boundary_target.main(["--runs", str(runs), "--out", str(tmp_path / "res"), "--threads", "1"]) == 0
    res = json.loads((tmp_path / "res" / "validation.json").read_text())
    val = json.loads((runs / "binary-seed0" / "splits.json").read_text())["val"]
    assert [(r["target"], r["seed"], r["images"]) for r in res["runs"]] == [("binary", 0, val), ("boundary", 0, val)]
    binary, boundary = res["runs"]
    assert binary["decoding"] == instances.DEFAULT.describe() and "grid" not in binary
    assert boundary["decoding"] == instances.BOUNDARY.describe()
    assert len(boundary["grid"]) == len(boundary_target.interior_grid())
    mine = next(g for g in boundary["grid"] if g["decoding"] == instances.BOUNDARY.describe())
    assert mine["summary"] == boundary["model"]  # the grid holds the comparison's decoding, scored alike
    for part in ("over_set", "per_image_mean"):
        for k in ("DC", "AJI", "PQ", "F1", "DSB"):
            assert res["boundary_minus_binary"]["0"][part][k] == pytest.approx(
                boundary["model"][part][k] - binary["model"][part][k])
    md = (tmp_path / "res" / "validation.md").read_text()
    assert "boundary - binary, seed 0" in md and "Otsu + watershed" in md and "test split is not read" in md
    assert boundary_target.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
