import os

import numpy as np
import pytest
from PIL import Image

from cdcl_nuclei import data


def _rng(seed=0):
    return np.random.default_rng(seed)


def _write_layout(root, n=3, shape=(20, 24)):
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    samples = {}
    for i in range(n):
        img = _rng(i).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
        lab = _rng(i + 10).integers(0, 5, size=shape).astype(np.uint16) * 300
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(lab).save(root / "labels" / f"s{i}.png")
        samples[f"s{i}"] = (img, lab)
    return samples


def test_layout_round_trip(tmp_path):
    samples = _write_layout(tmp_path)
    assert data.detect_format(str(tmp_path)) == "layout"
    entries = data.read_folder(str(tmp_path))
    assert [e.id for e in entries] == ["s0", "s1", "s2"]
    for e in entries:
        s = e.load()
        img, lab = samples[e.id]
        assert s.image.dtype == np.uint8 and np.array_equal(s.image, img)
        assert s.labels.dtype == np.int32 and np.array_equal(s.labels, lab.astype(np.int32))


def test_dsb_original_format_later_mask_wins(tmp_path):
    sid = "abc123"
    os.makedirs(tmp_path / sid / "images")
    os.makedirs(tmp_path / sid / "masks")
    rgba = _rng().integers(0, 256, size=(10, 12, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / sid / "images" / f"{sid}.png")
    m1 = np.zeros((10, 12), np.uint8)
    m1[1:5, 1:5] = 255
    m2 = np.zeros((10, 12), np.uint8)
    m2[3:7, 3:8] = 255
    Image.fromarray(m1).save(tmp_path / sid / "masks" / "a.png")
    Image.fromarray(m2).save(tmp_path / sid / "masks" / "b.png")
    assert data.detect_format(str(tmp_path)) == "dsb"
    (e,) = data.read_folder(str(tmp_path))
    s = e.load()
    assert np.array_equal(s.image, rgba[..., :3])
    want = np.zeros((10, 12), np.int32)
    want[m1 > 0] = 1
    want[m2 > 0] = 2
    assert np.array_equal(s.labels, want)


def test_dsb_mask_of_wrong_size_names_the_file(tmp_path):
    os.makedirs(tmp_path / "x" / "images")
    os.makedirs(tmp_path / "x" / "masks")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "x" / "images" / "x.png")
    Image.fromarray(np.zeros((9, 12), np.uint8)).save(tmp_path / "x" / "masks" / "m7.png")
    (e,) = data.read_folder(str(tmp_path), "dsb")
    with pytest.raises(data.DataError, match="m7.png"):
        e.load()


MONUSEG_XML = """<?xml version="1.0"?>
<Annotations><Annotation Id="1"><Regions>
 <Region Id="1"><Vertices><Vertex X="2" Y="2"/><Vertex X="5" Y="2"/><Vertex X="5" Y="4"/><Vertex X="2" Y="4"/></Vertices></Region>
 <Region Id="2"><Vertices><Vertex X="10.2" Y="8"/><Vertex X="13" Y="8"/><Vertex X="13" Y="11"/><Vertex X="10.2" Y="11"/></Vertices></Region>
 <Region Id="3"><Vertices><Vertex X="1" Y="1"/><Vertex X="3" Y="3"/></Vertices></Region>
</Regions></Annotation></Annotations>
"""


def test_monuseg_tif_and_xml(tmp_path):
    os.makedirs(tmp_path / "Tissue Images")
    os.makedirs(tmp_path / "Annotations")
    img = _rng().integers(0, 256, size=(16, 18, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "Tissue Images" / "TCGA-1.tif")
    (tmp_path / "Annotations" / "TCGA-1.xml").write_text(MONUSEG_XML)
    assert data.detect_format(str(tmp_path)) == "monuseg"
    (e,) = data.read_folder(str(tmp_path))
    s = e.load()
    assert np.array_equal(s.image, img)
    # polygons cover their boundary pixels: x 2..5, y 2..4
    want1 = np.zeros((16, 18), bool)
    want1[2:5, 2:6] = True
    assert np.array_equal(s.labels == 1, want1)
    assert (s.labels == 2).sum() > 0 and (s.labels == 2)[8:12, 11:14].all()
    assert set(np.unique(s.labels)) == {0, 1, 2}  # the two-vertex region is dropped


def test_monuseg_missing_or_broken_xml(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.tif")
    (tmp_path / "b.xml").write_text(MONUSEG_XML)
    with pytest.raises(data.DataError, match="a.tif"):
        data.read_folder(str(tmp_path), "monuseg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.tif")
    os.remove(tmp_path / "a.tif")
    (tmp_path / "b.xml").write_text("<Annotations><Region>")
    (e,) = data.read_folder(str(tmp_path), "monuseg")
    with pytest.raises(data.DataError, match="b.xml"):
        e.load()


def test_bad_files_name_the_file(tmp_path):
    _write_layout(tmp_path, n=2)
    os.remove(tmp_path / "labels" / "s1.png")
    with pytest.raises(data.DataError, match=r"labels.s1\.png"):
        data.read_folder(str(tmp_path))
    # truncated image
    raw = (tmp_path / "images" / "s0.png").read_bytes()
    (tmp_path / "images" / "s0.png").write_bytes(raw[: len(raw) // 3])
    os.remove(tmp_path / "images" / "s1.png")
    (e,) = data.read_folder(str(tmp_path))
    with pytest.raises(data.DataError, match=r"s0\.png"):
        e.load()
    # size mismatch between image and labels
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "images" / "s0.png")
    with pytest.raises(data.DataError, match=r"labels.s0\.png"):
        data.read_folder(str(tmp_path))[0].load()
    # colour label map
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "labels" / "s0.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "images" / "s0.png")
    with pytest.raises(data.DataError, match="single-channel"):
        data.read_folder(str(tmp_path))[0].load()
    with pytest.raises(data.DataError, match="not found"):
        data.read_folder(str(tmp_path / "nope"))


def test_seeded_split_7_1_2():
    items = list(range(48))
    tr, va, te = data.seeded_split(items, (7, 1, 2), seed=3)
    assert (len(tr), len(va), len(te)) == (34, 5, 9)
    assert sorted(tr + va + te) == items
    assert data.seeded_split(items, (7, 1, 2), seed=3) == [tr, va, te]
    assert data.seeded_split(items, (7, 1, 2), seed=4) != [tr, va, te]
    tr, va = data.seeded_split(list(range(30)), (8, 2), seed=0)
    assert (len(tr), len(va)) == (24, 6)


@pytest.mark.parametrize("frac,want", [("1/32", 15), ("1/16", 29), ("1/8", 58), ("1", 464), (0.125, 58)])
def test_labeled_fractions(frac, want):
    idx = data.labeled_indices(464, frac, seed=1)
    assert len(idx) == want and len(set(idx)) == want and all(0 <= i < 464 for i in idx)
    assert idx == data.labeled_indices(464, frac, seed=1)


def test_labeled_fraction_bad_values():
    assert len(data.labeled_indices(5, "1/32", 0)) == 1  # never an empty labeled set
    for bad in ("0", "2", "x", "1/0"):
        with pytest.raises(ValueError, match="labeled_fraction"):
            data.parse_fraction(bad)


def test_tiles_without_overlap():
    img = _rng().integers(0, 256, size=(1000, 1000, 3), dtype=np.uint8)
    lab = _rng(1).integers(0, 9, size=(1000, 1000)).astype(np.int32)
    tiles = data.tile_sample(data.Sample("t", img, lab), 250)
    assert len(tiles) == 16
    assert np.array_equal(tiles[5].image, img[250:500, 250:500])
    assert np.array_equal(tiles[7].labels, lab[250:500, 750:1000])
    assert len({t.id for t in tiles}) == 16
    assert len(data.tile_sample(data.Sample("u", img[:600, :520], lab[:600, :520]), 250)) == 4


def test_resize_keeps_label_ids():
    lab = _rng().integers(0, 7, size=(37, 53)).astype(np.int32) * 1000
    img = _rng().integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    x, y = data.resize_image(img, 32), data.resize_labels(lab, 32)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (32, 32) and set(np.unique(y)) <= set(np.unique(lab))


def test_training_samples_native_or_resized():
    img = _rng().integers(0, 256, size=(40, 70, 3), dtype=np.uint8)
    lab = _rng(1).integers(0, 5, size=(40, 70)).astype(np.int32)
    entry = data.Entry("a", lambda: data.Sample("a", img, lab))
    native = data.training_samples([entry], progress=False)[0]
    assert native.image.shape == (40, 70, 3) and np.array_equal(native.labels, lab)
    assert np.array_equal(native.image, data.stretch_contrast(img))
    small = data.training_samples([entry], resize=32, progress=False)[0]
    assert small.image.shape == (32, 32, 3) and small.labels.shape == (32, 32)


def test_dataset_splits_dsb_and_monuseg(tmp_path):
    _write_layout(tmp_path / "dsb", n=10)
    s = data.dataset_splits("dsb", str(tmp_path / "dsb"), seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [7, 1, 2]
    _write_layout(tmp_path / "mo" / "train", n=5)
    _write_layout(tmp_path / "mo" / "test", n=2)
    s = data.dataset_splits("monuseg", str(tmp_path / "mo"), seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [4, 1, 2]
    with pytest.raises(ValueError, match="dataset"):
        data.dataset_splits("kaggle", str(tmp_path))


def test_stretch_contrast():
    img = np.full((10, 10, 3), 12, np.uint8)
    img[2:5, 2:5] = 40
    out = data.stretch_contrast(img, 0, 100)
    assert out.min() == 0 and out.max() == 255
    assert (out[2:5, 2:5] == 255).all() and (out[6:, 6:] == 0).all()
    flat = np.full((4, 4, 3), 7, np.uint8)
    assert np.array_equal(data.stretch_contrast(flat), flat)
