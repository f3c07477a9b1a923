"""Image IO and pairing images with masks by sample ID."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from src_models.data import pair_files, read_image, read_mask, sample_id, write_tiff
from src_models.errors import R2UNetError


def _touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        arr = np.zeros((4, 4), np.uint8)
        if name.endswith((".tif", ".tiff")):
            tifffile.imwrite(folder / name, arr)
        else:
            Image.fromarray(arr).save(folder / name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("21_training.tif", "21"), ("21_manual1.gif", "21"), ("21_training_mask.gif", "21"), ("01_test.tif", "01"),
     ("01_test_mask.gif", "01"), ("a.png", "a"), ("case7_label.png", "case7"), ("ISIC_0001_segmentation.png", "isic_0001")],
)
def test_sample_ids(name, expected):
    assert sample_id(Path(name)) == expected


def test_drive_layout_pairs(tmp_path):
    ids = ["21", "22", "23"]
    _touch_images(tmp_path / "images", [f"{i}_training.tif" for i in ids])
    _touch_images(tmp_path / "1st_manual", [f"{i}_manual1.gif" for i in ids])
    _touch_images(tmp_path / "mask", [f"{i}_training_mask.gif" for i in ids])
    samples = pair_files(tmp_path / "images", tmp_path / "1st_manual", tmp_path / "mask")
    assert [s.id for s in samples] == ids
    assert samples[1].mask.name == "22_manual1.gif" and samples[1].fov.name == "22_training_mask.gif"


def test_same_stem_layout_pairs(tmp_path):
    _touch_images(tmp_path / "img", ["a.png", "b_mask.png", "c.tif"])
    _touch_images(tmp_path / "gt", ["a.png", "b_mask.png", "c.png"])
    samples = pair_files(tmp_path / "img", tmp_path / "gt")
    assert [(s.image.name, s.mask.name) for s in samples] == [("a.png", "a.png"), ("b_mask.png", "b_mask.png"), ("c.tif", "c.png")]


def test_unmatched_files_are_listed(tmp_path):
    _touch_images(tmp_path / "img", ["1_test.tif", "2_test.tif", "3_test.tif"])
    _touch_images(tmp_path / "gt", ["1_manual1.gif", "2_manual1.gif", "9_manual1.gif"])
    with pytest.raises(R2UNetError, match=r"images without a mask.*3_test\.tif.*masks without an image: 9_manual1\.gif"):
        pair_files(tmp_path / "img", tmp_path / "gt")


def test_ambiguous_files_are_listed(tmp_path):
    _touch_images(tmp_path / "img", ["1_test.tif", "2_test.tif"])
    _touch_images(tmp_path / "gt", ["1_manual1.gif", "1_manual2.gif", "2_manual1.gif"])
    with pytest.raises(R2UNetError, match=r"ambiguous.*1_manual1\.gif, 1_manual2\.gif"):
        pair_files(tmp_path / "img", tmp_path / "gt")


def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(R2UNetError, match="does not exist"):
        pair_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(R2UNetError, match="no image files"):
        pair_files(tmp_path / "empty")


def test_read_lzw_tiff_palette_gif_and_16_bit_png(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "lzw.tif", rgb, compression="lzw")
    assert np.array_equal(read_image(tmp_path / "lzw.tif"), rgb)
    mask = (rgb[..., 0] > 128).astype(np.uint8) * 255
    Image.fromarray(mask).convert("P").save(tmp_path / "m.gif")
    assert np.array_equal(read_image(tmp_path / "m.gif"), mask)
    assert np.array_equal(read_mask(tmp_path / "m.gif"), mask > 0)
    deep = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert np.array_equal(read_image(tmp_path / "d.png"), deep)


def test_unreadable_images(tmp_path):
    (tmp_path / "fake.png").write_bytes(b"this is not a png")
    with pytest.raises(R2UNetError, match=r"cannot read .*fake\.png"):
        read_image(tmp_path / "fake.png")
    with pytest.raises(R2UNetError, match="does not exist"):
        read_image(tmp_path / "missing.tif")


@pytest.mark.parametrize("values", [[0, 1], [0, 255], [0], [255], [0, 7]])
def test_binary_masks(tmp_path, values):
    arr = np.array(values * 8, np.uint8).reshape(-1, len(values))
    Image.fromarray(arr).save(tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), arr > 0)


def test_near_gray_palette_masks(tmp_path):
    """Like DRIVE's 2nd_manual GIFs: palette colours (4, 2, 4) and (252, 254, 252)."""
    index = np.zeros((6, 6), np.uint8)
    index[2:4] = 1
    img = Image.fromarray(index, mode="P")
    img.putpalette([4, 2, 4, 252, 254, 252] + [0] * 762)
    img.save(tmp_path / "m.gif")
    assert np.array_equal(read_mask(tmp_path / "m.gif"), index > 0)
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "c.png")
    with pytest.raises(R2UNetError, match="colour image"):
        read_mask(tmp_path / "c.png")


def test_non_binary_masks_are_refused(tmp_path):
    Image.fromarray(np.array([[0, 1, 2]], np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(R2UNetError, match="values 0, 1, 2"):
        read_mask(tmp_path / "m.png")


def test_write_tiff_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.tif"
    write_tiff(target, np.ones((5, 5), np.uint8))
    assert np.array_equal(tifffile.imread(target), np.ones((5, 5), np.uint8))
    assert target.stat().st_mode & 0o644 == 0o644, "written files get the usual permissions, not mkstemp's 0600"

    def boom(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(R2UNetError, match="No space left"):
        write_tiff(target, np.zeros((5, 5), np.uint8))
    monkeypatch.undo()
    assert np.array_equal(tifffile.imread(target), np.ones((5, 5), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]
