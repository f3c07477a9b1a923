"""The numpy connected components and Otsu threshold of the start-up path agree with scipy's and
skimage's on random and structured masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from src_models.components import fill_holes, label, otsu_threshold


def masks():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.45, 0.6, 0.8):
        yield rng.random((37, 53)) < density
    yy, xx = np.mgrid[:60, :70]
    ring = (np.hypot(yy - 30, xx - 35) < 25) & (np.hypot(yy - 30, xx - 35) > 10)
    yield ring
    spiral = np.zeros((40, 40), bool)
    spiral[5, 5:35] = spiral[5:35, 34] = spiral[34, 8:35] = spiral[10:35, 8] = spiral[10, 8:30] = True
    yield spiral
    yield np.zeros((5, 7), bool)
    yield np.ones((5, 7), bool)


@pytest.mark.parametrize("mask", list(masks()))
def test_label_and_fill_holes_match_scipy(mask):
    ours, count = label(mask)
    theirs, expected = ndimage.label(mask)
    assert count == expected
    np.testing.assert_array_equal(ours, theirs)  # same numbering too (order of the first pixel)
    np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_otsu_matches_skimage():
    rng = np.random.default_rng(1)
    for values in (np.concatenate([rng.normal(10, 2, 5000), rng.normal(40, 5, 3000)]), rng.random(999) * 255,
                   rng.integers(0, 4, 1000).astype(float)):
        assert otsu_threshold(values) == pytest.approx(threshold_otsu(values), abs=1e-9)
    assert otsu_threshold(np.full(10, 3.0)) == 3.0


def test_label_refuses_other_dimensions():
    with pytest.raises(ValueError, match="2D"):
        label(np.zeros((2, 3, 4), bool))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.uint16, np.int16])
@pytest.mark.parametrize("n", [1, 2, 3, 100, 4097])
def test_percentiles_are_numpys(dtype, n):
    from src_models.components import percentiles

    values = (np.random.default_rng(n).random(n) * 1000 - (0 if np.dtype(dtype).kind == "u" else 300)).astype(dtype)
    for qs in ([1, 99], [0, 100], [0.5, 99.5], [50], [3.3, 96.7]):
        got = percentiles(values, qs)
        assert got.dtype == np.float64 and got.shape == (len(qs),)
        np.testing.assert_allclose(got, np.percentile(values, qs), rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert percentiles(values, 50) == pytest.approx(float(np.percentile(values, 50)), rel=1e-6)
    with pytest.raises(ValueError):
        percentiles(values, [101])
    with pytest.raises(ValueError):
        percentiles(values[:0], [50])
