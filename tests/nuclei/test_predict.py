"""cdcl-predict (predict.py) on small crops of the bundled images with an untrained tiny model: the
inputs it takes (folders, files, glob patterns), the label images of the chosen decoding, the
probability TIFFs, and one-line errors for inputs it cannot take."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cdcl_nuclei import cli_predict as predict
from cdcl_nuclei import instances, models
from cdcl_nuclei import predictor as predictor_module
from cdcl_nuclei.checkpoint import save_checkpoint
from cdcl_nuclei.evaluate import InferenceConfig, predict_probability
from cdcl_nuclei.imagefiles import read_labels
from nuclei_scripts import SAMPLE, one_thread  # noqa: E402, F401 (one_thread: autouse fixture)

INFERENCE = {"window": 64, "overlap": 16, "flips": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, model) of an untrained tiny model: what it predicts is arbitrary but fixed."""
    torch.manual_seed(0)
    cfg = models.model_config("tiny")
    model = models.build_model(cfg).eval()
    path = tmp_path_factory.mktemp("ckpt") / "c.pt"
    save_checkpoint(path, {"epoch": 1, "step": 1, "run_id": "r", "student": model.state_dict(),
                           "config": {"model": models.asdict(cfg), "inference": INFERENCE}})
    return path, model


def _crops(folder, n, size=(48, 64), ext="png", skip=0):
    """The top-left corners of n bundled images (after the first `skip`), as files <folder>/<id>.<ext>."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for p in sorted((SAMPLE / "images").iterdir())[skip:skip + n]:
        Image.fromarray(np.asarray(Image.open(p).convert("RGB"))[:size[0], :size[1]]).save(folder / f"{p.stem}.{ext}")
        ids.append(p.stem)
    return ids


def _run(ckpt, out, *args):
    return predict.main(["--checkpoint", str(ckpt), "--out", str(out), "--no-progress", *args])


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def test_folders_files_and_globs(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    a, b = tmp_path / "a", tmp_path / "b"
    in_a, in_b = _crops(a, 2), _crops(b, 1, ext="tif", skip=2)
    out = tmp_path / "o1"
    assert _run(ckpt, out, str(a), str(b / "*.tif")) == 0  # a folder and a pattern, as arguments
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(f"{i}.png" for i in in_a + in_b)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(f"{i}.png" for i in in_a + in_b)
    for i in in_a + in_b:
        assert np.asarray(Image.open(out / "masks" / f"{i}.png")).shape == (48, 64)
    out = tmp_path / "o2"
    assert _run(ckpt, out, "--images", str(a / f"{in_a[1]}.png")) == 0  # one file, after the flag
    assert [p.name for p in (out / "masks").iterdir()] == [f"{in_a[1]}.png"]
    out = tmp_path / "o3"
    assert _run(ckpt, out, str(a), str(a / "*.png")) == 0  # a file named twice is predicted once
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(f"{i}.png" for i in in_a)


def test_labels_are_the_chosen_decoding_and_probabilities_the_models(tmp_path, checkpoint):
    ckpt, model = checkpoint
    (sid,) = _crops(tmp_path / "in", 1)
    image = np.asarray(Image.open(tmp_path / "in" / f"{sid}.png"))
    prob = predict_probability(model, image, InferenceConfig(**INFERENCE))
    # the untrained model's median as the threshold: half the image foreground, so many blobs
    threshold = float(np.median(prob))
    for name, dtype in (("components", "float16"), ("watershed", "uint8")):
        out = tmp_path / name
        assert _run(ckpt, out, str(tmp_path / "in"), "--instances", name, "--threshold", repr(threshold),
                    "--save-probabilities", "--probability-dtype", dtype) == 0
        written = Image.open(out / "masks" / f"{sid}.png")
        assert written.mode.startswith("I;16")  # uint16 PNG
        # the checkpoint predates --target: a binary model, decoded as one
        expected = instances.decode(prob > threshold, prob, instances.for_target(name, "binary"))
        np.testing.assert_array_equal(read_labels(out / "masks" / f"{sid}.png"), expected)
        p = tifffile.imread(out / "probabilities" / f"{sid}.tif")
        assert p.dtype == np.dtype(dtype) and p.shape == image.shape[:2]
        scale = 1.0 if dtype == "float16" else 255.0
        np.testing.assert_allclose(p.astype(np.float64) / scale, prob, atol=1e-3 if scale == 1.0 else 0.5 / 255)
    components = read_labels(tmp_path / "components" / "masks" / f"{sid}.png")
    assert components.max() > 1  # the comparison above was not between two empty maps


def test_more_nuclei_than_a_png_holds(tmp_path, checkpoint, capsys, monkeypatch):
    ckpt, _ = checkpoint
    (sid,) = _crops(tmp_path / "in", 1, size=(256, 256))
    many = np.arange(1, 256 * 256 + 1, dtype=np.int32).reshape(256, 256)  # 65,536 nuclei: one too many
    monkeypatch.setattr(instances, "decode", lambda *a, **k: many)
    assert _run(ckpt, tmp_path / "png", str(tmp_path / "in")) == 2
    _one_line_error(capsys, "--label-format", sid, "65536", "tif")
    assert _run(ckpt, tmp_path / "tif", str(tmp_path / "in"), "--label-format", "tif") == 0
    back = tifffile.imread(tmp_path / "tif" / "masks" / f"{sid}.tif")
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, many)


def test_images_whose_every_blob_the_decoding_dropped_are_counted(tmp_path, checkpoint, capsys, monkeypatch):
    ckpt, _ = checkpoint
    _crops(tmp_path / "in", 2)
    decode = instances.decode
    # the first image's blobs all dropped (as the decoding does where the model is never sure), the other's kept
    calls = iter((True, False))
    monkeypatch.setattr(instances, "decode", lambda mask, *a, **k: (
        np.zeros(np.shape(mask), np.int32) if next(calls) else decode(np.ones(np.shape(mask), bool))))
    monkeypatch.setattr(predictor_module, "predict_maps", lambda model, image, *a, **k: (
        np.full(image.shape[:2], 0.6, np.float32), None))
    assert _run(ckpt, tmp_path / "out", str(tmp_path / "in")) == 0
    out = capsys.readouterr().out
    assert "note: on 1 of 2 images the decoding dropped every blob the model found" in out


@pytest.mark.parametrize("make,needles", [
    (lambda d: [str(d / "*.png")], ["*.png", "matches no image file"]),
    (lambda d: [str(d / "gone.png")], ["gone.png", "file not found"]),
    (lambda d: [str(d / "notes.txt")], ["notes.txt", "not an image file"]),
    (lambda d: [str(d), "--instances", "bogus"], ["--instances", "bogus"]),
    (lambda d: [str(d), "--otsu-side", "left"], ["--otsu-side", "left"]),
    (lambda d: [str(d), "--channel", "-1"], ["--channel", "-1"]),
    (lambda d: [str(d), "--images", str(d)], ["--images", "not both"]),
], ids=["empty-glob", "missing-file", "not-an-image", "instances", "otsu-side", "channel", "twice"])
def test_bad_inputs_are_one_line(tmp_path, checkpoint, capsys, make, needles):
    ckpt, _ = checkpoint
    (tmp_path / "notes.txt").write_text("x")
    try:
        status = _run(ckpt, tmp_path / "o", *make(tmp_path))
    except SystemExit as e:  # the parser's refusals leave through argparse
        status = e.code
    assert status == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "o" / "masks").exists()
