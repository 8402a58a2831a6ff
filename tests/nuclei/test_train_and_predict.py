"""cdcl-train / cdcl-predict (train.py / predict.py) end to end on tiny settings: resume equivalence,
checkpoint errors, a short run on bundled images, predict, and a 2-process DDP smoke test."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cdcl_nuclei import cli_predict as predict
from cdcl_nuclei import cli_train as train
from cdcl_nuclei import instances, losses, models
from cdcl_nuclei.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cdcl_nuclei.evaluate import inference_config, predict_probability
from cdcl_nuclei.imagefiles import read_labels
from experiments import table1
from nuclei_scripts import SAMPLE, TINY
from nuclei_scripts import assert_same_state as _assert_same_state
from paths import ROOT


@pytest.fixture(autouse=True)
def _keep_thread_count():
    # the runs use one thread (small tensors; several threads only contend on a shared CI box);
    # the rest of the suite gets its setting back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _log_rows(out):
    with open(out / "log.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_resume_is_bit_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = TINY + ["--method", "cdcl", "--epochs", "2", "--no-test"]
    assert train.main(common + ["--out", str(a)]) == 0
    assert train.main(common + ["--out", str(b), "--stop-after-epochs", "1"]) == 0
    assert load_checkpoint(b / "last.pt")["epoch"] == 1
    assert train.main(common + ["--out", str(b), "--resume", "auto"]) == 0
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert sa["epoch"] == sb["epoch"] == 2 and sa["step"] == 4
    assert sa["loss"]["bank.feats"].shape[0] > 0  # the bank is part of what must match
    for key in ("student", "teacher", "optimizer", "scheduler", "loss", "rng", "best_dice"):
        _assert_same_state(sa[key], sb[key], key)
    assert _log_rows(a) == _log_rows(b)


def test_checkpoint_errors(tmp_path, capsys):
    out = tmp_path / "run"
    common = TINY + ["--method", "meanteacher", "--epochs", "1", "--no-test", "--out", str(out)]
    assert train.main(common) == 0
    ckpt = out / "last.pt"
    # the settings of a resumed run must match
    assert train.main([*common, "--method", "cdcl", "--resume", str(ckpt)]) == 2
    assert "different run setting" in capsys.readouterr().err
    other = tmp_path / "copy"  # the same images in another folder
    shutil.copytree(SAMPLE, other)
    # every setting that changes the computation is compared, and named as its flag with both values
    for flag, value, old in (("--lr", "0.5", "0.0001"), ("--temperature", "5", "0.1"), ("--grid", "4", "8"),
                             ("--w-contr", "100", "0.1"), ("--data", str(other), str(SAMPLE))):
        assert train.main([*common, flag, value, "--resume", str(ckpt)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and value in err and old in err, err
    # where and how it runs may change
    assert train.main([*common, "--threads", "2", "--no-progress", "--resume", str(ckpt)]) == 0
    # and how the test is decoded and compared; a checkpoint from before those settings (and --channel,
    # --target) existed resumes as one that left them at their defaults
    st = load_checkpoint(ckpt)
    for key in ("instances", "otsu_side", "channel", "target"):
        del st["config"][key]
    old = tmp_path / "old.pt"
    save_checkpoint(old, st)
    assert train.main([*common, "--instances", "components", "--otsu-side", "dark", "--resume", str(old)]) == 0
    # reading another plane of the images changes what is trained on
    assert train.main([*common, "--channel", "1", "--resume", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--channel: checkpoint None, now 1" in err, err
    # truncated
    raw = ckpt.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(raw[: len(raw) // 2])
    assert train.main([*common, "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "truncated.pt" in err and "not a readable checkpoint" in err and "Traceback" not in err
    # foreign
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="not a cdcl_nuclei/2"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    # weights of another model
    st = load_checkpoint(ckpt)
    st["student"] = {"x": torch.zeros(1)}
    st.pop("format")
    save_checkpoint(bad, st)
    assert train.main([*common, "--resume", str(bad)]) == 2
    assert "student weights do not fit" in capsys.readouterr().err


def test_atomic_save_leaves_no_temporary(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"epoch": 0, "config": {}, "student": {}})
    save_checkpoint(tmp_path / "c.pt", {"epoch": 1, "config": {}, "student": {}})
    assert os.listdir(tmp_path) == ["c.pt"]
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 1


def test_end_to_end_loss_falls_and_outputs_written(tmp_path):
    out = tmp_path / "e2e"
    args = ["--data", str(SAMPLE), "--preset", "small", "--input-size", "64", "--max-images", "12",
            "--method", "cdcl", "--labeled-fraction", "1/2", "--epochs", "6", "--iters-per-epoch", "4",
            "--batch-size", "4", "--unlabeled-batch-size", "4", "--unsup-start-epoch", "2", "--lr", "3e-3",
            "--no-progress", "--overlays", "2", "--threads", "1", "--out", str(out)]
    assert train.main(args) == 0
    rows = _log_rows(out)
    assert len(rows) == 6
    assert float(rows[-1]["sup"]) < 0.8 * float(rows[0]["sup"])
    assert rows[0]["contr"] == "" and float(rows[1]["contr"]) >= 0  # the unlabeled branch starts at epoch 2
    for name in ("config.json", "splits.json", "last.pt", "best.pt", "metrics.json", "metrics.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and 0 <= metrics["model"]["over_set"]["DC"] <= 1
    assert set(metrics["model"]["per_image_mean"]) == {"DC", "JC", "ACC", "SP", "SE", "AJI", "AJI+", "PQ", "SQ",
                                                       "F1", "DSB"}
    # the instance report: the model's watershed and components beside the classical pipeline's
    for name in ("model_components", "otsu_components", "model_minus_otsu_components"):
        assert set(metrics[name]) >= {"over_set", "per_image_mean"}, name
    # the Otsu baseline on the same images, and the model's difference to it
    assert metrics["otsu"]["images"] == 3 and 0.5 < metrics["otsu"]["over_set"]["DC"] <= 1
    for part in ("over_set", "per_image_mean"):
        assert metrics["model_minus_otsu"][part]["DC"] == pytest.approx(
            metrics["model"][part]["DC"] - metrics["otsu"][part]["DC"])
    md = (out / "metrics.md").read_text()
    assert "Otsu" in md and "model - Otsu" in md
    assert len(os.listdir(out / "overlays")) == 2
    test_ids = json.loads((out / "splits.json").read_text())["test"]
    assert [r["image"] for r in metrics["per_image"]] == test_ids
    assert {"model", "otsu"} <= set(metrics["per_image"][0])

    # predict.py on the held-out images, with their ground truth
    pin = tmp_path / "pin"
    os.makedirs(pin / "images")
    os.makedirs(pin / "labels")
    for sid in test_ids:
        for d in ("images", "labels"):
            (pin / d / f"{sid}.png").write_bytes((SAMPLE / d / f"{sid}.png").read_bytes())
    pout = tmp_path / "pred"
    assert predict.main(["--checkpoint", str(out / "best.pt"), "--images", str(pin), "--out", str(pout),
                         "--save-probabilities", "--no-progress"]) == 0
    pm = json.loads((pout / "metrics.json").read_text())
    # same model, same images, same tiling, same decoding: the same numbers as train.py's test evaluation
    assert pm["decoding"] == metrics["decoding"] and pm["decoding"]["model"]["method"] == "watershed"
    for name in ("model", "model_components", "otsu", "otsu_components"):
        for part in ("over_set", "per_image_mean"):
            assert pm[name][part] == pytest.approx(metrics[name][part], abs=1e-12), name
    # the label image holds the nuclei that report counted: the watershed of the model's probability
    st = load_checkpoint(out / "best.pt")
    model = models.build_model(models.config_from_dict(st["config"]["model"])).eval()
    model.load_state_dict(st["student"])
    icfg = inference_config(st["config"]["inference"])
    sid = test_ids[0]
    image = np.asarray(Image.open(SAMPLE / "images" / f"{sid}.png").convert("RGB"))
    prob = predict_probability(model, image, icfg)
    written = Image.open(pout / "masks" / f"{sid}.png")
    assert written.mode.startswith("I;16")  # a uint16 PNG
    nuclei = read_labels(pout / "masks" / f"{sid}.png")
    np.testing.assert_array_equal(nuclei, instances.decode(prob > icfg.threshold, prob, instances.DEFAULT))
    # a model this short-trained is rarely sure enough for the watershed's markers; its components:
    pcomp = tmp_path / "pred-components"
    assert predict.main(["--checkpoint", str(out / "best.pt"), "--images", str(pin), "--out", str(pcomp),
                         "--instances", "components", "--no-progress"]) == 0
    pc = json.loads((pcomp / "metrics.json").read_text())
    assert pc["decoding"]["model"] == {"method": "components"}
    for part in ("over_set", "per_image_mean"):
        assert pc["model"][part] == pytest.approx(metrics["model_components"][part], abs=1e-12)
    blobs = read_labels(pcomp / "masks" / f"{sid}.png")
    np.testing.assert_array_equal(blobs, instances.decode(prob > icfg.threshold, decoding=instances.COMPONENTS))
    assert blobs.max() > 1
    saved = tifffile.imread(pout / "probabilities" / f"{sid}.tif")
    assert saved.dtype == np.float16 and saved.shape == image.shape[:2]
    np.testing.assert_allclose(saved, prob, atol=1e-3)
    gt = np.asarray(Image.open(SAMPLE / "labels" / f"{sid}.png"))
    assert nuclei.shape == gt.shape
    ov = np.asarray(Image.open(pout / "overlays" / f"{sid}.png"))
    assert ov.shape == gt.shape + (3,)
    # images without ground truth: masks and overlays only
    pout2 = tmp_path / "pred2"
    assert predict.main(["--checkpoint", str(out / "best.pt"), "--images", str(pin / "images"),
                         "--out", str(pout2), "--label-format", "tif", "--no-progress"]) == 0
    assert (pout2 / "masks" / f"{sid}.tif").is_file() and not (pout2 / "metrics.json").exists()


def test_overlay_colours():
    from cdcl_nuclei.evaluate import overlay

    img = np.zeros((1, 4, 3), np.uint8)
    pred = np.array([[1, 1, 0, 0]])
    gt = np.array([[0, 5, 5, 0]])
    o = overlay(img, pred, gt, alpha=1.0)
    assert o[0].tolist() == [[0, 255, 0], [255, 255, 0], [255, 0, 0], [0, 0, 0]]


def test_predict_errors(tmp_path, capsys):
    assert predict.main(["--checkpoint", str(tmp_path / "none.pt"), "--images", str(tmp_path),
                         "--out", str(tmp_path / "o")]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_ddp_two_processes_smoke(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *TINY, "--method", "cdcl", "--epochs", "1", "--no-test", "--out", str(out)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    st = load_checkpoint(out / "last.pt")
    # the bank holds the features of both ranks: capacity = 2 ranks x (1 image x 8 x 8 pixels)
    assert st["loss"]["bank.feats"].shape[0] == 2 * (2 * 1 * 8 * 8)
    assert len(_log_rows(out)) == 1


def test_table1_protocol_runs_and_writes_the_table(tmp_path):
    out = tmp_path / "t1"
    common = ["--data", str(SAMPLE), "--fraction", "1/4", "--preset", "tiny", "--out", str(out), "--in-process",
              "--", "--max-images", "12", "--batch-size", "2", "--unlabeled-batch-size", "2", "--epochs", "1",
              "--iters-per-epoch", "1", "--unsup-start-epoch", "1", "--threads", "1", "--overlays", "0"]
    table1.main(["--seeds", "0", "1"] + common)
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == {"suponly", "meanteacher", "cdcl"}
    for m in ("suponly", "cdcl"):
        run = json.loads((out / f"{m}-seed1" / "metrics.json").read_text())
        assert res["summary"][m]["dice_set"][1] == pytest.approx(100 * run["model_components"]["over_set"]["DC"])
    d = [r["dice_set"] for r in res["runs"] if r["method"] == "cdcl"]
    s = [r["dice_set"] for r in res["runs"] if r["method"] == "suponly"]
    pair = res["paired"]["cdcl - suponly"]
    assert pair["dice_set"]["mean"] == pytest.approx((d[0] - s[0] + d[1] - s[1]) / 2)
    lo, hi = pair["dice_set"]["ci95"]
    assert lo <= pair["dice_set"]["mean"] <= hi
    assert set(res["paired"]) == {"meanteacher - suponly", "cdcl - suponly", "cdcl - meanteacher"}
    run = json.loads((out / "cdcl-seed0" / "metrics.json").read_text())
    row = next(r for r in res["runs"] if r["method"] == "cdcl" and r["seed"] == 0)
    assert row["aji_set"] == pytest.approx(100 * run["model"]["over_set"]["AJI"])
    assert row["otsu_pq_set"] == pytest.approx(100 * run["otsu"]["over_set"]["PQ"])
    md = (out / "results.md").read_text()
    assert "cdcl - suponly" in md and "meanteacher - suponly" in md and "cdcl - meanteacher" in md
    assert "Otsu + watershed (classical" in md and "AJI over the set" in md
    assert "What L_contr saw" in md and "8 x 8 pixels (1 x 1 features" in md
    # every method of a seed saw the same labeled images
    ids = [json.loads((out / f"{m}-seed0" / "splits.json").read_text())["train_labeled"] for m in res["summary"]]
    assert ids[0] == ids[1] == ids[2]
    # a finished table is not recomputed
    mtime = (out / "cdcl-seed0" / "metrics.json").stat().st_mtime
    table1.main(["--seeds", "0", "1"] + common)
    assert (out / "cdcl-seed0" / "metrics.json").stat().st_mtime == mtime


def test_tensorboard_scalars_and_previews(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb-run"
    assert train.main(TINY + ["--method", "cdcl", "--epochs", "2", "--out", str(out)]) == 0
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    val_ids = json.loads((out / "splits.json").read_text())["val"]
    assert {f"val/{i}" for i in val_ids[:4]} <= set(tags["images"])
    scalars = set(tags["scalars"])
    assert scalars, "no scalars written"
    assert any("loss" in t for t in scalars), scalars
    for tag in scalars:
        assert len(acc.Scalars(tag)) >= 1


def test_bf16_autocast_and_channels_last_run(tmp_path):
    out = tmp_path / "bf16"
    assert train.main(TINY + ["--method", "cdcl", "--epochs", "1", "--autocast", "bf16", "--channels-last",
                              "--no-test", "--out", str(out)]) == 0
    rows = _log_rows(out)
    assert len(rows) == 1 and np.isfinite(float(rows[0]["loss"])) and float(rows[0]["contr"]) > 0


def test_gpu_table1_script_on_a_tiny_cpu_schedule(tmp_path):
    env = dict(os.environ, DATA=str(SAMPLE), DEVICE="cpu", PRESET="tiny", EPOCHS="2", ITERS="1", CROP="64",
               UNSUP_START="2", MAX_IMAGES="40", OUT=str(tmp_path / "g"), WORK=str(tmp_path / "w"),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_table1.sh")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tail = r.stdout.strip().splitlines()[-6:]
    assert tail[0] == "== suponly" and tail[3] == "== cdcl"
    assert all(line.startswith("model:") for line in (tail[1], tail[4]))
    assert all(line.startswith("Otsu:") for line in (tail[2], tail[5]))
    # what a lease brings back: few files, no checkpoint; the checkpoints stay in WORK
    assert sorted(os.listdir(tmp_path / "g")) == ["cdcl.log", "results.tar.gz", "summary.txt", "suponly.log"]
    with tarfile.open(tmp_path / "g" / "results.tar.gz") as tar:
        names = tar.getnames()
    for m in ("suponly", "cdcl"):
        assert f"./{m}/metrics.json" in names and (tmp_path / "w" / m / "last.pt").is_file()
    assert not any(n.endswith(".pt") for n in names)


def test_gpu_table1_dry_run_checks_the_data_and_the_transfer_size(tmp_path):
    env = dict(os.environ, DATA=str(SAMPLE), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_table1.sh"), "--dry-run"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"data \S+ [0-9.]+ MiB \+ tracked files [0-9.]+ MiB = [0-9.]+ MiB of the 64 MiB transfer",
                     r.stdout), r.stdout
    assert "--autocast bf16 --channels-last" in r.stdout and r.stdout.count("train.py") == 2
    missing = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_table1.sh"), "--dry-run"],
                             env=dict(env, DATA=str(tmp_path / "none")), cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("gpu_table1: DATA: expected")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_soft_dice_loss():
    target = torch.tensor([[[0, 1], [1, 0]]])
    perfect = torch.stack([1 - target, target], dim=1).float() * 40 - 20
    assert float(losses.soft_dice_loss(perfect, target)) < 1e-6
    # all wrong: only the +1 smoothing is left, 1 - 1 / (2 + 2 + 1)
    assert float(losses.soft_dice_loss(-perfect, target)) == pytest.approx(0.8, abs=1e-6)


def test_resize_protocol_and_val_every(tmp_path):
    out = tmp_path / "rs"
    assert train.main(TINY + ["--method", "suponly", "--epochs", "3", "--val-every", "2", "--resize",
                              "--overlays", "0", "--out", str(out)]) == 0
    rows = _log_rows(out)
    assert [r["val_dice"] == "nan" for r in rows] == [True, False, False]  # epochs 2 and 3 (the last)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resize"] is True and cfg["inference"]["resize"] == 64
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and 0 <= metrics["model"]["over_set"]["DC"] <= 1


@pytest.mark.parametrize("flag", [["--val-every", "0"], ["--scale-range", "1.2", "0.8"], ["--window", "100"],
                                  ["--input-size", "96"]])
def test_bad_training_flags_exit_2(tmp_path, capsys, flag):
    assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "x")] + flag) == 2
    assert flag[0] in capsys.readouterr().err


def test_semi_levers_table_keeps_an_earlier_sessions_runs(tmp_path):
    from experiments import semi_levers

    runs, out = tmp_path / "runs", tmp_path / "out"
    run = runs / "mt-new-seed0"
    run.mkdir(parents=True)
    fields = ["epoch", "val_dice", "teacher_val_dice", "w_cons", "seconds"]
    rows = [[1, 0.5, 0.4, 0, 10], [2, 0.7, 0.6, 0.5, 10]]
    (run / "log.csv").write_text(",".join(fields) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    (run / "done").write_text("")
    out.mkdir()
    nan_curve = {"best": 0.8, "last": 0.8, "best_epoch": 1, "first": 0.8, "curve": [0.8, None],
                 "teacher_curve": [None, None], "teacher_best": None, "epochs": 2, "seconds": 5.0,
                 **{k: None for k in ("pl_acc", "pl_conf_share", "pl_conf_acc", "pl_dice", "cons_kept",
                                      "pl_dice_fluorescence", "pl_dice_brightfield", "pl_dice_stained")}}
    # an earlier table: a variant whose run folder is gone, and a seed of the new variant that is redone now
    (out / "results.json").write_text(json.dumps({"suponly": {"0": nan_curve},
                                                  "mt-new": {"0": {**nan_curve, "best": 0.1}}}))
    assert semi_levers.main(["--runs", str(runs), "--out", str(out), "--baseline", "suponly"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"suponly", "mt-new"}
    assert res["mt-new"]["0"]["best"] == pytest.approx(0.7)  # the run present now wins
    assert res["suponly"]["0"]["best"] == 0.8 and np.isnan(res["suponly"]["0"]["curve"][1])  # None read as NaN
    md = (out / "results.md").read_text()
    assert "1 runs of an earlier session kept" in md and "| mt-new | 70.00 (2) / 70.00 | 70.00 | -10.00 |" in md
