"""Training on the user's own images (--labeled, --unlabeled, --val, --test) instead of the benchmark
protocol: the folders, files and globs read, the validation images held out, the two modes kept
apart, and a short run that uses unlabeled images without label files, resumes and tests."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import tifffile
import torch

from cdcl_nuclei import cli_train, config, crops, data
from cdcl_nuclei.checkpoint import load_checkpoint
from cdcl_nuclei.pseudo_labels import PseudoLabelStats
from nuclei_scripts import SAMPLE
from nuclei_scripts import assert_same_state as _assert_same_state

RUN = ["--preset", "tiny", "--method", "cdcl", "--batch-size", "2", "--unlabeled-batch-size", "2",
       "--iters-per-epoch", "2", "--epochs", "2", "--unsup-start-epoch", "1", "--no-progress", "--overlays", "0",
       "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _own_images(root):
    """A user's images made from the bundled sample, as PNG and TIFF:
    mine/images + mine/labels (6 labeled, lab0's label a TIFF), pool/ (4 unlabeled: 2 PNG, an RGB
    TIFF and a 16-bit grey TIFF; no labels anywhere), more/ (ex0.tif, ex1.tif and ex2.png),
    held/images + held/labels (2 test images)."""
    ids = sorted(p.stem for p in (SAMPLE / "images").glob("*.png"))

    def image(i):
        return SAMPLE / "images" / f"{ids[i]}.png"
    for sub in ("mine/images", "mine/labels", "pool", "more", "held/images", "held/labels"):
        (root / sub).mkdir(parents=True)
    for k in range(6):
        shutil.copy(image(k), root / "mine" / "images" / f"lab{k}.png")
        if k == 0:
            tifffile.imwrite(root / "mine" / "labels" / "lab0.tif",
                             data.read_labels(SAMPLE / "labels" / f"{ids[k]}.png").astype(np.uint16))
        else:
            shutil.copy(SAMPLE / "labels" / f"{ids[k]}.png", root / "mine" / "labels" / f"lab{k}.png")
    for k in range(2):
        shutil.copy(image(6 + k), root / "pool" / f"unl{k}.png")
        shutil.copy(image(13 + k), root / "held" / "images" / f"t{k}.png")
        shutil.copy(SAMPLE / "labels" / f"{ids[13 + k]}.png", root / "held" / "labels" / f"t{k}.png")
    tifffile.imwrite(root / "pool" / "unl2.tif", data.read_image(image(8)), photometric="rgb")
    grey = data.read_image(image(9))[..., 0].astype(np.uint16) * 257 + 3
    tifffile.imwrite(root / "pool" / "unl3.tif", grey)
    for k in range(2):
        tifffile.imwrite(root / "more" / f"ex{k}.tif", data.read_image(image(10 + k)), photometric="rgb")
    shutil.copy(image(12), root / "more" / "ex2.png")
    return root


def _log_rows(out):
    with open(out / "log.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_a_short_run_learns_from_unlabeled_images_without_labels_resumes_and_tests(tmp_path, capsys):
    d = _own_images(tmp_path)
    own = ["--labeled", str(d / "mine"), "--unlabeled", str(d / "pool"), str(d / "more" / "*.tif")]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_train.main(RUN + own + ["--out", str(a)]) == 0
    printed = capsys.readouterr().out
    assert "cdcl: 5 labeled + 6 unlabeled training images, 1 val, 0 test images" in printed
    assert "validation: 1 of the 6 labeled images held out (1/8, at least one, seeded by --split-seed 0" in printed
    assert "no test images (--test names them): the run ends after training" in printed
    assert not (a / "metrics.json").exists()
    splits = json.loads((a / "splits.json").read_text())
    assert sorted(splits["train_unlabeled"]) == ["ex0", "ex1", "unl0", "unl1", "unl2", "unl3"]
    assert len(splits["val"]) == 1 and not set(splits["val"]) & set(splits["train_labeled"])
    assert sorted(splits["val"] + splits["train_labeled"]) == [f"lab{k}" for k in range(6)]
    rows = _log_rows(a)
    assert len(rows) == 2
    for r in rows:
        # the teacher judged unlabeled crops every epoch; with no labels to hide, nothing is scored against any
        assert 0.0 <= float(r["pl_conf_share"]) <= 1.0 and r["pl_acc"] == r["pl_conf_acc"] == r["pl_dice"] == ""
        # the unlabeled terms ran (L_cons may keep no pixel of a barely trained teacher at the 0.95 threshold)
        assert float(r["ent"]) > 0 and 0.0 <= float(r["cons_kept"]) <= 1.0 and 0.0 <= float(r["val_dice"]) <= 1.0
        assert 0.0 <= float(r["teacher_val_dice"]) <= 1.0  # validation images are labeled
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["labeled"] == [os.path.realpath(d / "mine")] and cfg["unlabeled"][1].endswith("*.tif")
    assert cfg["val"] is cfg["test"] is cfg["data"] is cfg["labeled_fraction"] is None

    # the same run in two parts, the second repeated from config.json with test images added
    assert cli_train.main(RUN + own + ["--out", str(b), "--stop-after-epochs", "1"]) == 0
    assert cli_train.main(["--config", str(b / "config.json"), "--resume", "auto", "--test", str(d / "held")]) == 0
    printed = capsys.readouterr().out
    assert "testing the model of best.pt" in printed and "no test images" not in printed
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert sa["epoch"] == sb["epoch"] == 2
    for key in ("student", "teacher", "optimizer", "scheduler", "loss", "rng", "best_dice"):
        _assert_same_state(sa[key], sb[key], key)
    assert _log_rows(a) == _log_rows(b)
    metrics = json.loads((b / "metrics.json").read_text())
    assert metrics["images"] == 2 and 0.0 <= metrics["model"]["over_set"]["DC"] <= 1.0
    assert "(cdcl, 5 labeled + 6 unlabeled images)" in (b / "metrics.md").read_text()


def test_a_missing_label_is_one_line_naming_the_file(tmp_path, capsys):
    d = _own_images(tmp_path)
    (d / "mine" / "labels" / "lab3.png").unlink()
    out = tmp_path / "x"
    assert cli_train.main(RUN + ["--labeled", str(d / "mine"), "--unlabeled", str(d / "pool"),
                                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    mine = os.path.realpath(d / "mine")
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {mine}/labels/lab3.png: label file not found for image {mine}/images/lab3.png")
    assert not out.exists()


@pytest.mark.parametrize("given,named", [
    (["--data", "{sample}", "--labeled", "{mine}", "--unlabeled", "{pool}"], "--data and --labeled"),
    (["--labeled-fraction", "1/4", "--labeled", "{mine}", "--unlabeled", "{pool}"], "--labeled-fraction and --labeled"),
    (["--dataset", "monuseg", "--max-images", "3", "--unlabeled", "{pool}"], "--dataset and --unlabeled"),
    (["--format", "layout", "--test", "{mine}", "--labeled", "{mine}"], "--format and --labeled"),
])
def test_the_benchmark_protocol_and_own_images_exclude_each_other(tmp_path, capsys, given, named):
    args = [a.format(sample=SAMPLE, mine=tmp_path / "mine", pool=tmp_path / "pool") for a in given]
    assert cli_train.main(RUN + args + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {named}: choose the benchmark protocol "), err
    assert "(--labeled, --unlabeled, --val, --test), not both" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("given,why", [
    (["--unlabeled", "pool"], "--unlabeled: expected your labeled images beside it (--labeled)"),
    (["--labeled", "mine", "--val", "v"], "--unlabeled: method cdcl learns from unlabeled images too"),
    (["--labeled", "mine", "--method", "fullsup"], "--method: fullsup trains on every benchmark image"),
])
def test_own_images_need_labeled_ones_and_unlabeled_ones_for_a_semi_supervised_method(tmp_path, capsys, given, why):
    assert cli_train.main(RUN + given + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {why}"), err


def test_a_config_file_of_own_images_and_a_benchmark_flag_are_named_as_given(tmp_path, capsys):
    f = tmp_path / "own.json"
    f.write_text(json.dumps({"labeled": str(tmp_path / "mine"), "unlabeled": [str(tmp_path / "pool")]}))
    s, names = config.parse(config.TrainConfig, ["--config", str(f)])
    assert s.labeled == (str(tmp_path / "mine"),) and s.unlabeled == (str(tmp_path / "pool"),)
    assert cli_train.main(RUN + ["--config", str(f), "--data", str(SAMPLE), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data and {f}: labeled: choose the benchmark protocol"), err


def test_the_benchmark_defaults_fill_in_when_no_own_images_are_given(tmp_path):
    r = config.resolve_training(*config.parse(config.TrainConfig, [])).settings
    assert (r.dataset, r.format, r.labeled_fraction, r.max_images) == ("dsb", "auto", "1/8", None)
    assert r.data == os.path.realpath("data/dsb2018_sample") and r.labeled is r.unlabeled is r.val is None
    r = config.resolve_training(*config.parse(config.TrainConfig, ["--method", "fullsup"])).settings
    assert r.labeled_fraction == "1"
    os.symlink(tmp_path, tmp_path / "link")
    link = tmp_path / "link"
    r = config.resolve_training(*config.parse(config.TrainConfig, [
        "--labeled", str(link / "mine"), "--unlabeled", "pool", str(link / "*.tif")])).settings
    assert r.data is r.dataset is r.format is r.labeled_fraction is None
    # real paths, so that a resumed run reads the same files from any working directory
    assert r.labeled == (str(tmp_path.resolve() / "mine"),)
    assert r.unlabeled == (os.path.realpath("pool"), str(tmp_path.resolve() / "*.tif"))


def test_unlabeled_images_from_folders_files_and_globs_need_no_labels(tmp_path):
    d = _own_images(tmp_path)
    entries = data.own_images([str(d / "more" / "*.tif"), str(d / "pool"), str(d / "pool" / "unl0.png")], False)
    assert [e.id for e in entries] == ["ex0", "ex1", "unl0", "unl1", "unl2", "unl3"]  # ex2.png: not *.tif
    for e in entries:
        s = e.load()
        assert s.labels is None and s.image.dtype == np.uint8 and s.image.shape[2] == 3
        np.testing.assert_array_equal(s.image, data.read_image(e.path))
    # a file of two planes is read by --channel, as everywhere else
    planes = np.stack([np.zeros((40, 50), np.uint8), (np.arange(2000) % 251).astype(np.uint8).reshape(40, 50)])
    tifffile.imwrite(d / "more" / "ex3.tif", planes, photometric="minisblack")
    with pytest.raises(data.DataError, match="ex3.tif: an image of shape"):
        data.own_images([str(d / "more" / "ex3.tif")], False)[0].load()
    image = data.own_images([str(d / "more" / "ex3.tif")], False, channel=1)[0].load().image
    np.testing.assert_array_equal(image, np.repeat(planes[1][..., None], 3, axis=2))
    with pytest.raises(data.DataError, match=r"nothing\*.png: the pattern matches no image file"):
        data.own_images([str(d / "nothing*.png")], False)


def test_labeled_images_by_glob_find_their_labels_beside_and_unlabeled_copies_are_left_out(tmp_path):
    d = _own_images(tmp_path)
    # a glob of labeled images; one folder of every image as the unlabeled set
    parts = data.own_splits([str(d / "mine" / "images" / "lab[0-2].png")], [str(d / "mine")],
                            test=[str(d / "held")])
    assert [e.id for e in parts["train"]] == ["lab0", "lab1", "lab2"] and parts["val"] == []
    assert [e.id for e in parts["unlabeled"]] == ["lab3", "lab4", "lab5"]
    assert [e.id for e in parts["test"]] == ["t0", "t1"]
    np.testing.assert_array_equal(parts["train"][0].load().labels,
                                  tifffile.imread(d / "mine" / "labels" / "lab0.tif").astype(np.int32))
    assert parts["unlabeled"][0].load().labels is None
    # another file with a labeled image's id is refused, since ids name the outputs
    (d / "other").mkdir()
    shutil.copy(d / "pool" / "unl0.png", d / "other" / "lab1.png")
    with pytest.raises(data.DataError, match="two images with the id 'lab1'"):
        data.own_splits([str(d / "mine")], [str(d / "other")])


@pytest.mark.parametrize("n,k", [(2, 1), (4, 1), (8, 1), (12, 2), (17, 2), (20, 3), (40, 5)])
def test_validation_is_a_seeded_eighth_of_the_labeled_images_disjoint_from_training(n, k):
    items = list(range(n))
    train, val = data.hold_out_validation(items, 0)
    assert len(val) == k and sorted(train + val) == items and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # the given order kept
    assert data.hold_out_validation(items, 0) == (train, val)
    if n >= 12:
        assert len({tuple(data.hold_out_validation(items, seed)[1]) for seed in range(8)}) > 1


def test_one_labeled_image_cannot_also_validate(tmp_path, capsys):
    with pytest.raises(ValueError, match="^labeled: 1 labeled image"):
        data.hold_out_validation(["a"], 0)
    d = _own_images(tmp_path)
    mine = str(d / "mine" / "images" / "lab1.png")
    assert cli_train.main(RUN + ["--labeled", mine, "--unlabeled", str(d / "pool"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --labeled: 1 labeled image"), err


def test_crops_of_an_unlabeled_image_draw_as_those_of_a_labeled_one():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (50, 90)).astype(np.int32)
    x, y = crops.random_crops([data.Sample("a", image, labels)], [0, 0], 64, torch.Generator().manual_seed(5))
    xu, yu = crops.random_crops([data.Sample("a", image, None)], [0, 0], 64, torch.Generator().manual_seed(5))
    assert torch.equal(x, xu) and y.shape == (2, 64, 64) and yu is None


def test_the_pseudo_label_log_without_hidden_labels_keeps_the_confidence_share_only():
    # teacher: fg, fg, bg, bg; two of the four pixels confident
    t = torch.tensor([[[[0.0, 0.0], [5.0, 5.0]], [[5.0, 5.0], [0.0, 0.0]]]])
    confident = torch.tensor([[[True, False], [True, False]]])
    stats = PseudoLabelStats()
    stats.update(t, None, ["fluorescence"], confident)
    assert stats.summary() == {"pl_conf_share": 0.5, "pl_conf_share_fluorescence": 0.5}
