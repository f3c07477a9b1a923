"""Our label files (src_models.label_files): 0/255 masks other viewers show, read back as 0/1 with their provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from src_models.errors import R2UNetError
from src_models.label_files import TAG, label_file_header, read_label_file, write_label_file


def test_a_binary_mask_is_stored_0_255_and_read_back_0_1_with_its_provenance(tmp_path):
    mask = np.zeros((6, 7), np.int64)
    mask[2:4, 1:5] = 1
    path = write_label_file(tmp_path / "m.tif", mask, binary=True, provenance={"model": "tiny", "threshold": 0.4})
    stored = tifffile.imread(path)
    assert stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 255}  # visible in any viewer
    labels, header = read_label_file(path)
    assert np.array_equal(labels, mask) and labels.dtype == np.uint8
    assert header["binary"] is True and header["stored"] == "0/255" and header["model"] == "tiny" and header["threshold"] == 0.4
    assert label_file_header(path) == header
    assert [p.name for p in tmp_path.iterdir()] == ["m.tif"]  # atomic: no temporary file left


def test_classes_and_a_stack_of_stacks_keep_their_values_and_shape(tmp_path):
    labels = np.random.default_rng(0).integers(0, 300, size=(2, 3, 5, 6)).astype(np.int32)
    read, header = read_label_file(write_label_file(tmp_path / "c.tif", labels, binary=False))
    assert header["stored"] == "classes" and read.dtype == np.uint16
    assert read.shape == labels.shape and np.array_equal(read, labels)
    three = np.zeros((3, 5, 6), np.uint8)  # 3 slices, not an RGB image: gray pages in any viewer
    with tifffile.TiffFile(write_label_file(tmp_path / "s.tif", three, binary=True)) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK and len(tif.pages) == 3


def test_other_tiffs_are_not_ours(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "other.tif", np.zeros((4, 4), np.uint8), description=json.dumps({TAG: {"kind": "session"}}), metadata=None)
    (tmp_path / "text.tif").write_text("not a tiff")
    for name in ("plain.tif", "other.tif", "text.tif", "missing.tif"):
        assert label_file_header(tmp_path / name) is None and read_label_file(tmp_path / name) is None
    with pytest.raises(R2UNetError, match="negative"):
        write_label_file(tmp_path / "n.tif", np.array([[-1, 0]]), binary=False)
