"""Preprocessing: layouts, channel choices, dtypes, robust normalisation, non-finite values."""

from __future__ import annotations

import numpy as np
import pytest

from src_models.errors import R2UNetError
from src_models.preprocessing import (
    PreprocessConfig,
    guess_channel_axis,
    measure_stats,
    normalize_tile,
    preprocess,
    to_chw,
)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((32, 40), None), ((32, 40, 3), -1), ((32, 40, 4), -1), ((3, 32, 40), 0), ((32, 40, 1), -1), ((2, 3, 3), -1)],
)
def test_guess_channel_axis(shape, axis):
    assert guess_channel_axis(shape) == axis


@pytest.mark.parametrize("shape", [(32,), (2, 32, 40, 3), (10, 20, 30)])
def test_layouts_that_need_help(shape):
    with pytest.raises(R2UNetError):
        guess_channel_axis(shape)


def test_to_chw():
    hwc = np.arange(2 * 5 * 6 * 3).reshape(2, 5, 6, 3)[0]
    assert to_chw(hwc).shape == (3, 5, 6)
    assert np.array_equal(to_chw(hwc)[1], hwc[..., 1])
    assert to_chw(hwc[..., 0]).shape == (1, 5, 6)
    assert to_chw(np.moveaxis(hwc, -1, 0), channel_axis=0).shape == (3, 5, 6)


def _rgb(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)


def test_green_gray_rgb_all():
    img = _rgb()
    green = preprocess(img, PreprocessConfig(channels="green"))
    assert green.shape == (1, 24, 20) and green.dtype == np.float32
    ref = img[..., 1].astype(np.float64)
    lo, hi = np.percentile(ref, [1, 99])
    assert np.allclose(green[0], np.clip((ref - lo) / (hi - lo), -1, 2), atol=1e-5)
    assert preprocess(img, PreprocessConfig(channels="gray")).shape == (1, 24, 20)
    assert preprocess(img, PreprocessConfig(channels="rgb")).shape == (3, 24, 20)
    rgba = np.concatenate([img, np.full((24, 20, 1), 255, np.uint8)], -1)
    assert np.array_equal(preprocess(rgba, PreprocessConfig(channels="rgb")), preprocess(img, PreprocessConfig(channels="rgb")))
    assert preprocess(rgba, PreprocessConfig(channels="all")).shape == (4, 24, 20)
    gray = img[..., 0]
    assert preprocess(gray, PreprocessConfig(channels="rgb")).shape == (3, 24, 20)
    assert np.array_equal(preprocess(gray, PreprocessConfig(channels="green")), preprocess(gray, PreprocessConfig(channels="gray")))


@pytest.mark.parametrize("normalize", ["percentile", "zscore"])
def test_normalisation_does_not_depend_on_dtype_or_scale(normalize):
    img = _rgb()[..., 1]
    config = PreprocessConfig(channels="gray", normalize=normalize)
    ref = preprocess(img, config)
    for other in (img.astype(np.uint16) * 257, img.astype(np.float32) / 255.0, img.astype(np.float64) * 1000 - 5, img.astype(np.int64)):
        assert np.allclose(preprocess(other, config), ref, atol=1e-4)


def test_range_mode():
    img = np.array([[0, 65535]], dtype=np.uint16).repeat(8, 0)
    out = preprocess(img, PreprocessConfig(channels="gray", normalize="range"))
    assert out.min() == 0 and out.max() == pytest.approx(1.0)


def test_non_finite_values_are_ignored_then_zero():
    img = np.random.default_rng(0).normal(size=(30, 30)).astype(np.float32)
    img[3, 4], img[5, 6], img[7, 8] = np.nan, np.inf, -np.inf
    out = preprocess(img, PreprocessConfig(channels="gray"))
    assert np.isfinite(out).all() and out[0, 3, 4] == 0.0


def test_all_nan_image_is_refused():
    with pytest.raises(R2UNetError, match="no finite pixel values"):
        preprocess(np.full((8, 8), np.nan), PreprocessConfig(channels="gray"))


@pytest.mark.parametrize("value", [0, 7, 255])
def test_constant_and_bool_images(value):
    assert np.array_equal(preprocess(np.full((9, 9), value, np.uint8), PreprocessConfig(channels="gray")), np.zeros((1, 9, 9), np.float32))
    assert np.isfinite(preprocess(np.eye(9, dtype=bool), PreprocessConfig(channels="gray"))).all()


def test_tiles_normalised_with_image_stats_match_the_whole_image():
    img = _rgb(3)
    config = PreprocessConfig()
    chw = to_chw(img)
    stats = measure_stats(chw, config)
    whole = normalize_tile(chw, stats, config)
    assert np.array_equal(normalize_tile(chw[:, 5:17, 2:11], stats, config), whole[:, 5:17, 2:11])


def test_stats_of_a_large_image_use_a_subsample():
    img = np.random.default_rng(0).integers(0, 256, (4000, 3000), dtype=np.uint8)
    stats = measure_stats(to_chw(img), PreprocessConfig(channels="gray"))
    assert stats[0, 0] == pytest.approx(np.percentile(img, 1), abs=1.5)


@pytest.mark.parametrize(("kwargs", "word"), [({"channels": "cmyk"}, "channels"), ({"normalize": "minmax"}, "normalize"), ({"low": 50, "high": 10}, "percentiles")])
def test_ill_preprocess_configs(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PreprocessConfig(**kwargs)


def test_non_numeric_and_empty_images():
    from src_models.preprocessing import check_image

    with pytest.raises(R2UNetError, match="empty"):
        check_image(np.zeros((1, 0, 5)))
    with pytest.raises(R2UNetError, match="not numeric"):
        check_image(np.array([[["a"]]]))


def test_input_notice_says_how_an_image_was_fitted():
    from src_models.preprocessing import PreprocessConfig, input_notice

    rgb, gray, green = PreprocessConfig(channels="rgb"), PreprocessConfig(channels="gray"), PreprocessConfig(channels="green")
    assert "repeated to 3 channels" in input_notice(1, rgb, "skin lesion") and "skin lesion model" in input_notice(1, rgb, "skin lesion")
    assert "converted to gray" in input_notice(3, gray)
    assert "green channel" in input_notice(1, green)
    assert "alpha" in input_notice(4, rgb) and "alpha" in input_notice(2, gray)
    assert input_notice(3, rgb) is None and input_notice(1, gray) is None and input_notice(3, green) is None
    assert input_notice(5, PreprocessConfig(channels="all")) is None
