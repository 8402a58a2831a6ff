"""Image and label files as nuclei tools write them: TIFF round trips (uint16, uint32 above 65,535
ids, 16-bit images), multi-plane files refused or read by channel, label maps as TIFF in a data
folder, and the foreground probability as a TIFF."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from cdcl_nuclei import data, imagefiles
from cdcl_nuclei.evaluate import save_label_map


@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff"])
def test_uint16_label_maps_round_trip(tmp_path, ext):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 65536, size=(33, 47)).astype(np.int64)
    labels[0, 0] = 65535
    path = tmp_path / f"l{ext}"
    imagefiles.write_labels(path, labels)
    assert np.array_equal(imagefiles.read_labels(path), labels)
    if ext != ".png":
        assert tifffile.imread(path).dtype == np.uint16
    else:
        assert np.asarray(Image.open(path)).dtype == np.uint16


def test_more_than_65535_nuclei_go_to_a_uint32_tiff(tmp_path):
    labels = np.arange(300 * 300, dtype=np.int32).reshape(300, 300)  # ids 0..89,999
    path = tmp_path / "many.tif"
    save_label_map(path, labels)  # predict.py's name for the writer
    assert tifffile.imread(path).dtype == np.uint32
    back = imagefiles.read_labels(path)
    assert back.dtype == np.int32 and np.array_equal(back, labels)
    with pytest.raises(ValueError, match=r"instances: ids up to 89999 do not fit a 16-bit PNG.*\.tif"):
        imagefiles.write_labels(tmp_path / "many.png", labels)
    with pytest.raises(ValueError, match="^path:"):
        imagefiles.write_labels(tmp_path / "many.jpg", labels)
    with pytest.raises(ValueError, match="^instances:"):
        imagefiles.write_labels(tmp_path / "m.tif", labels > 0)
    with pytest.raises(ValueError, match="^instances:"):
        imagefiles.write_labels(tmp_path / "m.tif", labels - 1)


def test_16_bit_images_keep_their_grey_levels(tmp_path):
    rng = np.random.default_rng(1)
    # 12-bit fluorescence in a 16-bit file: background near 200, nuclei 1000..3000, and a few
    # saturated pixels far above (dividing by the maximum would crush the nuclei into ~10 levels)
    grey = rng.integers(150, 250, size=(64, 80)).astype(np.uint16)
    grey[10:40, 10:50] = rng.integers(1000, 3000, size=(30, 40))
    grey[0, :5] = 65535
    path = tmp_path / "g16.tif"
    tifffile.imwrite(path, grey)
    img = imagefiles.read_image(path)
    assert img.shape == (64, 80, 3) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    lo, hi = np.percentile(grey.astype(np.float64), (0.5, 99.5))
    want = ((grey - lo) * (255 / (hi - lo))).clip(0, 255).round().astype(np.uint8)
    assert np.array_equal(img[..., 0], want)
    assert len(np.unique(img[10:40, 10:50, 0])) > 150  # the nuclei keep many grey levels
    # order is kept: a brighter pixel is never darker after the mapping
    order = np.argsort(grey, axis=None, kind="stable")
    assert (np.diff(img[..., 0].ravel()[order].astype(int)) >= 0).all()
    # a 16-bit RGB TIFF and a 16-bit grey PNG go through the same mapping
    rgb = np.stack([grey, grey // 2, grey // 4], axis=2)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    assert imagefiles.read_image(tmp_path / "rgb16.tif").shape == (64, 80, 3)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert np.array_equal(imagefiles.read_image(tmp_path / "g16.png"), img)


def test_multi_page_tiffs_are_refused_or_read_by_channel(tmp_path):
    pages = np.stack([np.full((12, 15), 10 * (k + 1), np.uint8) for k in range(3)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, pages, photometric="minisblack")
    with pytest.raises(data.DataError, match=r"stack\.tif.*3 planes.*channel"):
        imagefiles.read_image(path)
    for k in range(3):
        img = imagefiles.read_image(path, channel=k)
        assert img.shape == (12, 15, 3) and (img == 10 * (k + 1)).all()  # that plane, not page 0
    with pytest.raises(data.DataError, match=r"stack\.tif: channel 3 .*3 planes"):
        imagefiles.read_image(path, channel=3)
    # a two-channel image (not RGB) is refused the same way
    two = np.zeros((12, 15, 2), np.uint16)
    two[..., 1] = 500
    tifffile.imwrite(tmp_path / "two.tif", two, photometric="minisblack", planarconfig="contig")
    with pytest.raises(data.DataError, match="two.tif"):
        imagefiles.read_image(tmp_path / "two.tif")
    # a stack of planes with several axes cannot be read as one image at all
    tifffile.imwrite(tmp_path / "zc.tif", np.zeros((2, 3, 12, 15), np.uint8), imagej=True,
                     metadata={"axes": "ZCYX"})
    with pytest.raises(data.DataError, match=r"zc\.tif.*stack"):
        imagefiles.read_image(tmp_path / "zc.tif", channel=0)
    # label maps never have planes to choose from
    with pytest.raises(data.DataError, match=r"stack\.tif: expected a single-channel"):
        imagefiles.read_labels(path)
    # a grey image has no channel to choose
    tifffile.imwrite(tmp_path / "g.tif", pages[0])
    with pytest.raises(data.DataError, match="single plane"):
        imagefiles.read_image(tmp_path / "g.tif", channel=0)


def test_rgb_tiff_and_channel_of_an_rgb_image(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "pil.tif")  # as MoNuSeg's images are written
    assert np.array_equal(imagefiles.read_image(tmp_path / "pil.tif"), rgb)
    rgba = np.concatenate([rgb, np.full((9, 11, 1), 255, np.uint8)], axis=2)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert np.array_equal(imagefiles.read_image(tmp_path / "rgba.tif"), rgb)
    blue = imagefiles.read_image(tmp_path / "pil.tif", channel=2)
    assert np.array_equal(blue, np.repeat(rgb[..., 2:], 3, axis=2))


def test_unreadable_tiffs_name_the_file(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(data.DataError, match="bad.tif"):
        imagefiles.read_image(tmp_path / "bad.tif")
    with pytest.raises(data.DataError, match="missing.tif: file not found"):
        imagefiles.read_labels(tmp_path / "missing.tif")
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(data.DataError, match="f.tif: expected a single-channel integer"):
        imagefiles.read_labels(tmp_path / "f.tif")


def test_a_data_folder_with_tiff_label_maps(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    labels = np.zeros((20, 24), np.uint32)
    labels[2:6, 2:6] = 70000  # an id a PNG could not hold
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    imagefiles.write_labels(tmp_path / "labels" / "a.tif", labels)
    (entry,) = data.read_folder(str(tmp_path))
    assert np.array_equal(entry.load().labels, labels.astype(np.int32))
    # a multi-page image in the folder: refused when loaded, or read by the folder's channel
    tifffile.imwrite(tmp_path / "images" / "b.tif", np.stack([np.full((20, 24), v, np.uint8) for v in (5, 9)]),
                     photometric="minisblack")
    imagefiles.write_labels(tmp_path / "labels" / "b.tiff", labels)
    with pytest.raises(data.DataError, match=r"b\.tif.*channel"):
        data.read_folder(str(tmp_path))[1].load()
    b = data.read_folder(str(tmp_path), channel=1)[1].load()
    assert b.id == "b" and (b.image == 9).all()
    Image.fromarray(np.zeros((20, 24), np.uint16)).save(tmp_path / "labels" / "a.png")
    with pytest.raises(data.DataError, match=r"a\.png and .*a\.tif: two label files"):
        data.read_folder(str(tmp_path))


def test_probability_tiffs(tmp_path):
    p = np.linspace(0, 1, 7 * 9, dtype=np.float32).reshape(7, 9)
    imagefiles.write_probability(tmp_path / "p.tif", p)
    back = tifffile.imread(tmp_path / "p.tif")
    assert back.dtype == np.float16 and np.abs(back.astype(np.float32) - p).max() <= 1e-3
    imagefiles.write_probability(tmp_path / "p8.tiff", p, dtype="uint8")
    back = tifffile.imread(tmp_path / "p8.tiff")
    assert back.dtype == np.uint8 and np.array_equal(back, (p * 255).round().astype(np.uint8))
    for kwargs, name in ((dict(path=tmp_path / "p.png"), "path"), (dict(dtype="float64"), "dtype"),
                         (dict(probability=p + 0.5), "probability"), (dict(probability=p > 0.5), "probability")):
        args = {"path": tmp_path / "q.tif", "probability": p, **kwargs}
        with pytest.raises(ValueError, match=f"^{name}:"):
            imagefiles.write_probability(**args)
