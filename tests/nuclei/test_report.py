"""The report of every evaluation: the model decoded its way and as components beside the classical
pipeline (Otsu + watershed, Otsu + components), over the set and per image, with the model's
differences; and the two summary lines."""
import json

import numpy as np
import pytest

from cdcl_nuclei.evaluate import Comparison, summary_lines, write_report
from cdcl_nuclei.instances import CLASSICAL, COMPONENTS, DEFAULT, Decoding, decode


def _touching_pair(shift=0):
    """An image of two touching bright nuclei on a dark background, their instance map, and a
    model-like probability that peaks in each nucleus."""
    yy, xx = np.mgrid[:64, :100]
    centres = [(32, 32 + shift), (32, 58 + shift)]
    d = [np.hypot(yy - r, xx - c) for r, c in centres]
    labels = np.zeros((64, 100), np.int32)
    labels[d[0] <= 14] = 1
    labels[(d[1] <= 14) & (labels == 0)] = 2
    image = np.full((64, 100, 3), 25, np.uint8)
    image[labels > 0] = 190
    prob = np.clip(1.0 - 0.5 * np.minimum(*d) / 14, 0, 1).astype(np.float32)
    return image, labels, prob


def _comparison(**kwargs):
    comp = Comparison(**kwargs)
    for k in range(2):
        image, labels, prob = _touching_pair(shift=5 * k)
        comp.update(prob > 0.5, image, labels, f"img{k}", probability=prob)
    return comp


def test_report_holds_every_pipeline_and_the_differences(tmp_path):
    comp = _comparison(decoding=Decoding(surface="probability", h=0.1))
    report = write_report(comp, tmp_path, "metrics", "Test metrics", extra={"run": "x"})
    assert report["run"] == "x" and report["images"] == 2
    for name in ("model", "model_components", "otsu", "otsu_components"):
        assert set(report[name]["over_set"]) == {"DC", "JC", "ACC", "SP", "SE", "AJI", "AJI+", "PQ", "SQ", "F1",
                                                 "DSB"}
    # the split is what the watershed adds: the same foreground (no speck to drop here), better nuclei
    for a, b in (("model", "model_components"), ("otsu", "otsu_components")):
        assert report[a]["over_set"]["DC"] == report[b]["over_set"]["DC"]
        assert report[a]["over_set"]["AJI"] > report[b]["over_set"]["AJI"]
    # the blob matches the larger nucleus (IoU just above 0.5) and misses the other: F1 = 1 / (1 + 0.5)
    assert report["model"]["over_set"]["F1"] == 1.0 and report["model_components"]["over_set"]["F1"] == 2 / 3
    for part in ("over_set", "per_image_mean"):
        for k in report["model"][part]:
            assert report["model_minus_otsu"][part][k] == pytest.approx(
                report["model"][part][k] - report["otsu"][part][k])
            assert report["model_minus_otsu_components"][part][k] == pytest.approx(
                report["model"][part][k] - report["otsu_components"][part][k])
    assert report["decoding"]["model"] == {"method": "watershed", "surface": "probability",
                                           "markers": "h_maxima", "sigma": 1.0, "h": 0.1, "unmarked": "keep"}
    assert report["decoding"]["otsu"] == {"side": "minority", **CLASSICAL.describe()}
    assert [r["image"] for r in report["per_image"]] == ["img0", "img1"]
    assert set(report["per_image"][0]) == {"image", "model", "model_components", "otsu", "otsu_components"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(report))
    md = (tmp_path / "metrics.md").read_text()
    for text in ("model (watershed)", "model, components", "Otsu + watershed", "Otsu + components",
                 "model - Otsu + watershed", "model - Otsu + components", "Over the set", "Mean per image",
                 "AJI+", "DSB", "| img1 |"):
        assert text in md, text


def test_summary_lines_give_dice_and_aji_of_the_model_and_the_classical_pipeline(tmp_path):
    report = write_report(_comparison(decoding=DEFAULT), tmp_path)
    model, otsu = summary_lines(report)
    assert model.startswith("model: Dice ") and "AJI" in model and "watershed" in model and "2 images" in model
    assert otsu.startswith("Otsu:  Dice ") and "Otsu + watershed" in otsu and "model - Otsu: Dice" in otsu
    m, o = report["model"]["over_set"], report["otsu"]["over_set"]
    assert f"AJI {100 * m['AJI']:.2f}" in model and f"AJI {100 * o['AJI']:.2f}" in otsu
    assert f"AJI {100 * (m['AJI'] - o['AJI']):+.2f}" in otsu


def test_components_decoding_and_pixel_only_reports(tmp_path):
    comp = _comparison()  # a caller with only the mask gets the components
    assert comp.decoding == COMPONENTS and list(comp.meters) == ["model", "otsu", "otsu_components"]
    report = write_report(comp, tmp_path)
    assert "model_components" not in report and report["decoding"]["model"] == {"method": "components"}
    pixels = write_report(_comparison(instances=False), tmp_path / "px")
    assert set(pixels["model"]["over_set"]) == {"DC", "JC", "ACC", "SP", "SE"}
    lines = summary_lines(pixels)
    assert "AJI" not in " ".join(lines) and lines[0].startswith("model: Dice")


def test_update_returns_the_models_nuclei_and_takes_them_decoded(tmp_path):
    image, labels, prob = _touching_pair()
    d = Decoding(surface="probability", h=0.1)
    a, b = Comparison(decoding=d), Comparison(decoding=d)
    got = a.update(prob > 0.5, image, labels, "x", probability=prob)
    assert np.array_equal(got, decode(prob > 0.5, prob, d)) and got.max() == 2
    b.update(prob > 0.5, image, labels, "x", instances=got)
    assert a.model.summary() == b.model.summary()
    with pytest.raises(ValueError, match="^probability:"):
        a.update(prob > 0.5, image, labels, "y")


def test_a_decoding_that_drops_every_blob_of_an_image_is_reported(tmp_path):
    comp = Comparison(decoding=DEFAULT)
    image, labels, prob = _touching_pair()
    comp.update(prob > 0.5, image, labels, "sure", probability=prob)  # peaks of 1.0: kept
    unsure = np.where(prob > 0.5, 0.6, 0.0).astype(np.float32)  # blobs, never above DEFAULT.min_peak
    assert unsure.max() <= DEFAULT.min_peak
    comp.update(unsure > 0.5, image, labels, "unsure", probability=unsure)
    comp.update(np.zeros_like(prob, bool), image, labels, "nothing", probability=np.zeros_like(prob))
    assert comp.emptied == ["unsure"]  # an empty foreground has nothing to drop
    report = write_report(comp, tmp_path)
    assert report["emptied"] == ["unsure"]
    lines = summary_lines(report)
    assert len(lines) == 3 and lines[2].startswith("note: on 1 of 3 images") and "--instances components" in lines[2]
    assert "dropped every blob the model found (none sure enough); --instances components keeps them: unsure" in (
        tmp_path / "metrics.md").read_text()
    assert len(summary_lines(write_report(_comparison(decoding=DEFAULT), tmp_path))) == 2
