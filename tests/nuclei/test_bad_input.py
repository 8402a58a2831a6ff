"""Hostile input to cdcl-train and cdcl-predict (train.py, predict.py): every bad flag, file or
checkpoint is one line naming it and exit status 2; corrupt checkpoints are caught by their
checksum; an interrupted save leaves nothing behind; a resumed run logs each epoch once; the test
evaluation uses this run's model only; a non-finite loss stops the run with exit status 3."""
import csv
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cdcl_nuclei import cli_predict as predict
from cdcl_nuclei import cli_train as train
from cdcl_nuclei import losses, models
from cdcl_nuclei.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nuclei_scripts import SAMPLE, TINY


@pytest.fixture(autouse=True)
def _keep_thread_count():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny suponly run (1 epoch) shared by the checkpoint tests."""
    out = tmp_path_factory.mktemp("trained")
    assert train.main(TINY + ["--method", "suponly", "--epochs", "1", "--no-test", "--out", str(out)]) == 0
    return out


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


def _fifo(tmp_path):
    path = tmp_path / "fifo.pt"
    os.mkfifo(path)
    return path


BAD_TRAIN_FLAGS = [
    ["--labeled-fraction", "0"], ["--labeled-fraction", "abc"], ["--labeled-fraction", "3/2"],
    ["--input-size", "100"], ["--input-size", "0"], ["--input-size", "-64"],
    ["--device", "bogus"], ["--device", "cuda:99"], ["--threads", "-1"], ["--threads", "0"],
    ["--max-images", "-3"], ["--max-images", "0"], ["--epochs", "0"], ["--iters-per-epoch", "0"],
    ["--batch-size", "0"], ["--unlabeled-batch-size", "-2"], ["--lr", "nan"], ["--lr", "-1"],
    ["--lr", "inf"], ["--poly-power", "-1"], ["--ema-alpha", "1.5"], ["--ema-alpha", "nan"],
    ["--unsup-start-epoch", "0"], ["--rampup-epochs", "-1"], ["--w-contr", "nan"], ["--w-cons", "-1"],
    ["--w-ent", "inf"], ["--w-dice", "-0.5"], ["--grid", "0"], ["--fdp", "1.5"], ["--bdp", "nan"],
    ["--temperature", "0"], ["--temperature", "nan"], ["--memory", "0"], ["--loss-backend", "bogus"],
    ["--stop-after-epochs", "0"], ["--overlays", "-1"], ["--window", "100"], ["--overlap", "-8"],
    ["--scale-range", "0", "1"], ["--pretrained", "missing.pt"],
]


@pytest.mark.parametrize("flag", BAD_TRAIN_FLAGS, ids=lambda f: " ".join(f))
def test_bad_training_flag_is_one_line_naming_it(tmp_path, capsys, flag):
    assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "x")] + flag) == 2
    _one_line_error(capsys, flag[0])
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
    _one_line_error(capsys, "--device", "cuda")


def test_out_naming_a_file_and_pretrained_not_a_regular_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert train.main(TINY + ["--epochs", "1", "--out", str(f)]) == 2
    _one_line_error(capsys, "--out", "file")
    # a FIFO would block the reader for ever; only regular files are opened
    assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "x"), "--pretrained", str(_fifo(tmp_path))]) == 2
    _one_line_error(capsys, "--pretrained", "fifo.pt")


def test_data_files_must_be_regular(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    os.mkfifo(tmp_path / "imgs" / "a.png")
    ckpt = tmp_path / "c.pt"
    _tiny_checkpoint(ckpt)
    assert predict.main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "imgs"), "--out",
                         str(tmp_path / "o"), "--no-progress"]) == 2
    _one_line_error(capsys, "a.png", "regular file")


def _tiny_checkpoint(path, **config_overrides):
    cfg = models.model_config("tiny")
    model = models.build_model(cfg)
    config = {"model": {**models.asdict(cfg), **config_overrides}, "inference": {"window": 64, "overlap": 16}}
    save_checkpoint(path, {"epoch": 1, "step": 2, "config": config, "student": model.state_dict(), "run_id": "r"})
    return model


def _predict(tmp_path, ckpt, images, *extra):
    return predict.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp_path / "pred"),
                         "--no-progress", *extra])


@pytest.mark.parametrize("flag", [["--threshold", "nan"], ["--threshold", "1.5"], ["--batch", "0"],
                                  ["--window", "50"], ["--overlap", "-1"], ["--device", "bogus"]],
                         ids=lambda f: " ".join(f))
def test_bad_predict_flag_is_one_line_naming_it(tmp_path, capsys, flag):
    ckpt = tmp_path / "c.pt"
    _tiny_checkpoint(ckpt)
    assert _predict(tmp_path, ckpt, SAMPLE, *flag) == 2
    _one_line_error(capsys, flag[0])


def test_predict_refuses_two_images_with_one_id(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb = np.zeros((40, 40, 3), np.uint8)
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(rgb).save(folder / "a.tif")
    ckpt = tmp_path / "c.pt"
    _tiny_checkpoint(ckpt)
    assert _predict(tmp_path, ckpt, folder) == 2
    _one_line_error(capsys, "a.png", "a.tif")


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", b"PK\x03\x04" + bytes(60)],
                         ids=["empty", "text", "zip-header"])
def test_foreign_files_named_pt(tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    assert _predict(tmp_path, bad, SAMPLE) == 2
    _one_line_error(capsys, "bad.pt")


def test_random_files_named_pt_are_refused(tmp_path):
    rng = random.Random(12)
    bad = tmp_path / "random.pt"
    for _ in range(60):
        bad.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))))
        with pytest.raises(CheckpointError, match="random.pt"):
            load_checkpoint(bad)


@pytest.mark.parametrize("override,field", [
    ({"growth": 10 ** 6}, "growth"), ({"growth": "16"}, "growth"), ({"blocks": [1, 1]}, "blocks"),
    ({"blocks": [1, 1, 1, 10 ** 5]}, "blocks"), ({"decoder": [8, -8, 8]}, "decoder"), ({"proj": 8}, "proj"),
    ({"dropout": 2.0}, "dropout"), ({"input_size": 0}, "input_size"), ({"num_classes": 1}, "num_classes"),
    ({"bogus": 1}, "bogus"), ({"init_features": True}, "init_features"),
    ({"decoder": [4096, 4096, 4096], "growth": 512, "blocks": [64, 64, 64, 64]}, "parameters"),
])
def test_crafted_model_config_in_a_checkpoint(tmp_path, capsys, override, field):
    ckpt = tmp_path / "c.pt"
    _tiny_checkpoint(ckpt, **override)
    assert _predict(tmp_path, ckpt, SAMPLE) == 2
    _one_line_error(capsys, "c.pt", field)


def test_checkpoint_without_model_config(tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, {"epoch": 1, "config": {"inference": {}}, "student": {}, "run_id": "r"})
    assert _predict(tmp_path, ckpt, SAMPLE) == 2
    _one_line_error(capsys, "c.pt", "model")
    save_checkpoint(ckpt, {"epoch": 1, "config": [1, 2], "student": {}, "run_id": "r"})
    assert _predict(tmp_path, ckpt, SAMPLE) == 2
    _one_line_error(capsys, "c.pt", "config")


def test_every_single_byte_flip_is_caught_or_harmless(tmp_path):
    path = tmp_path / "c.pt"
    model = _tiny_checkpoint(path)
    raw = bytearray(path.read_bytes())
    want = model.state_dict()
    rng = random.Random(3)
    caught = 0
    for pos in rng.sample(range(len(raw)), 150):
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        try:
            st = load_checkpoint(path)
        except CheckpointError as e:
            assert "c.pt" in str(e)
            caught += 1
            continue
        for k, v in want.items():  # a flip that loads must not have changed anything
            assert torch.equal(st["student"][k], v), (pos, k)
    assert caught > 0


def test_checksum_catches_a_changed_weight(tmp_path):
    path = tmp_path / "c.pt"
    _tiny_checkpoint(path)
    st = torch.load(path, weights_only=True)
    st["student"]["encoder.features.conv0.weight"][0, 0, 0, 0] += 1.0
    torch.save(st, path)  # a valid file whose payload no longer matches its checksum
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_interrupted_save_is_cleaned_at_the_next_start(trained, capsys):
    stale = trained / ".tmp-abc123.pt"
    stale.write_bytes(b"\0" * 1000)  # what a kill -9 inside the save window leaves
    assert train.main(TINY + ["--method", "suponly", "--epochs", "1", "--no-test", "--out", str(trained),
                              "--resume", "auto"]) == 0
    assert not stale.exists()


def _epochs(out):
    with open(out / "log.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def test_log_has_one_row_per_epoch_after_resumes(tmp_path):
    out = tmp_path / "run"
    common = TINY + ["--method", "suponly", "--epochs", "3", "--no-test", "--out", str(out)]
    assert train.main(common + ["--stop-after-epochs", "1"]) == 0
    # a kill between the log row and the checkpoint of epoch 2: the row is there, the checkpoint not
    with open(out / "log.csv", "a") as f:
        f.write("2," + ",".join([""] * 16) + "\n")
    assert train.main(common + ["--resume", "auto", "--stop-after-epochs", "1"]) == 0
    assert train.main(common + ["--resume", "auto"]) == 0
    assert _epochs(out) == [1, 2, 3]


NO_VAL = TINY[:TINY.index("--max-images")] + ["--max-images", "4"] + TINY[TINY.index("--max-images") + 2:]
# (4 images split 7:1:2 leave no validation image, so no run writes best.pt)


def test_test_evaluation_uses_this_runs_model_only(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = NO_VAL + ["--method", "suponly", "--epochs", "2", "--overlays", "0"]
    assert train.main(common + ["--out", str(a), "--no-test"]) == 0
    assert train.main(common + ["--out", str(b), "--stop-after-epochs", "1"]) == 0
    (b / "best.pt").write_bytes((a / "last.pt").read_bytes())  # another run's model in this folder
    assert train.main(common + ["--out", str(b), "--resume", "auto"]) == 2
    _one_line_error(capsys, "best.pt", "another run")


def test_no_validation_split_says_the_last_epoch_was_tested(tmp_path, capsys):
    out = tmp_path / "noval"
    assert train.main(NO_VAL + ["--method", "suponly", "--epochs", "1", "--overlays", "0", "--out", str(out)]) == 0
    assert not (out / "best.pt").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"] == "last epoch (no validation images, so no best.pt)"
    assert "no validation images" in capsys.readouterr().out


def test_non_finite_loss_stops_with_exit_3(tmp_path, capsys, monkeypatch):
    out = tmp_path / "nan"
    common = TINY + ["--method", "meanteacher", "--epochs", "2", "--no-test", "--out", str(out)]
    real = losses.entropy
    calls = {"n": 0}

    def entropy_nan_from_step_3(logits):
        calls["n"] += 1
        return real(logits) * (float("nan") if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(losses, "entropy", entropy_nan_from_step_3)
    assert train.main(common) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 3" in err and "ent" in err, err
    st = load_checkpoint(out / "last.pt")  # the checkpoint of epoch 1 is intact
    assert st["epoch"] == 1 and all(torch.isfinite(v).all() for v in st["student"].values() if v.is_floating_point())


def test_resume_refuses_non_finite_weights(trained, tmp_path, capsys):
    st = torch.load(trained / "last.pt", weights_only=True)
    st["student"]["encoder.features.conv0.weight"].fill_(float("nan"))
    st.pop("sha256")
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, st)
    assert train.main(TINY + ["--method", "suponly", "--epochs", "1", "--no-test", "--out", str(tmp_path / "r"),
                              "--resume", str(bad)]) == 2
    _one_line_error(capsys, "nan.pt", "encoder.features.conv0.weight", "non-finite")
