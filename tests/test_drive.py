"""Checks against the real DRIVE layout in ../shared (skipped where it is absent, e.g. a user's clone)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DRIVE

from src_models.data import pair_files, read_image, read_mask

pytestmark = [pytest.mark.drive, pytest.mark.skipif(not DRIVE.is_dir(), reason="DRIVE is not in ../shared/datasets")]


@pytest.mark.parametrize(("split", "manual", "count"), [("training", "1st_manual", 20), ("test", "1st_manual", 20), ("test", "2nd_manual", 20)])
def test_drive_folders_pair_by_sample_id(split, manual, count):
    samples = pair_files(DRIVE / split / "images", DRIVE / split / manual, DRIVE / split / "mask")
    assert len(samples) == count
    for s in samples:
        assert s.image.name.split("_")[0] == s.mask.name.split("_")[0] == s.fov.name.split("_")[0] == s.id


def test_drive_files_read_as_expected():
    sample = pair_files(DRIVE / "test" / "images", DRIVE / "test" / "1st_manual", DRIVE / "test" / "mask")[0]
    image = read_image(sample.image)  # LZW-compressed TIFF: needs imagecodecs
    mask, fov = read_mask(sample.mask), read_mask(sample.fov)
    assert image.shape == (584, 565, 3) and image.dtype == np.uint8
    assert mask.shape == fov.shape == (584, 565) and mask.dtype == bool
    assert 0.05 < mask[fov].mean() < 0.2
    second = read_mask(DRIVE / "test" / "2nd_manual" / f"{sample.id}_manual2.gif")  # a near-gray palette GIF
    assert second.shape == mask.shape and 0.05 < second[fov].mean() < 0.2
