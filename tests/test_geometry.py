"""Letterbox geometry (``resize`` cards): placement, exact round trips, masks, bad shapes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src_models.errors import R2UNetError
from src_models.geometry import letterbox, letterbox_box, letterbox_mask, unletterbox

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(48, 64), (64, 48), (64, 64), (3, 5), (1, 1), (2, 700), (700, 2), (1, 1000), (333, 97)]


@pytest.mark.parametrize("height, width", SHAPES)
def test_the_box_keeps_the_aspect_ratio_and_is_centred(height, width):
    box = letterbox_box(height, width, 64)
    assert max(box.inner_height, box.inner_width) == 64
    scale = 64 / max(height, width)  # each side is the scaled side rounded (at least one pixel)
    assert abs(box.inner_height - max(1.0, height * scale)) <= 0.5 and abs(box.inner_width - max(1.0, width * scale)) <= 0.5
    assert box.top == (64 - box.inner_height) // 2 and box.left == (64 - box.inner_width) // 2


@pytest.mark.parametrize("height, width", SHAPES)
def test_round_trip_shapes_and_constant_images_are_exact(height, width):
    image = np.full((2, height, width), 0.25, np.float32)
    boxed, box = letterbox(image, 64)
    assert boxed.shape == (2, 64, 64) and boxed.dtype == np.float32
    np.testing.assert_array_equal(boxed, 0.25)  # edge padding continues the image
    back = unletterbox(np.full((3, 64, 64), 0.7, np.float32), box)
    assert back.shape == (3, height, width)
    np.testing.assert_allclose(back, 0.7, rtol=0, atol=1e-6)  # bilinear of a constant, float32 rounding


@pytest.mark.parametrize("height, width", [(40, 64), (64, 40), (64, 64)])
def test_at_the_training_size_the_round_trip_is_the_identity(height, width):
    """Longer side == size: no resampling, so letterbox then unletterbox returns the image bit for bit."""
    image = np.random.default_rng(0).random((1, height, width), dtype=np.float32)
    boxed, box = letterbox(image, 64)
    np.testing.assert_array_equal(unletterbox(boxed, box), image)


def test_a_smooth_image_survives_a_down_and_up_round_trip():
    yy, xx = np.mgrid[0:120, 0:200] / 200.0
    image = (0.5 + 0.4 * np.sin(3 * xx) * np.cos(2 * yy))[None].astype(np.float32)
    boxed, box = letterbox(image, 64)
    assert np.abs(unletterbox(boxed, box) - image).max() < 0.02


def test_the_content_is_where_the_box_says_and_the_band_is_the_edge():
    image = np.zeros((1, 32, 64), np.float32)
    image[:, 0, :] = 1.0  # top row bright: the padding above replicates it
    boxed, box = letterbox(image, 64)
    assert (box.top, box.inner_height, box.left, box.inner_width) == (16, 32, 0, 64)
    np.testing.assert_array_equal(boxed[0, :16], 1.0)
    np.testing.assert_array_equal(boxed[0, 16:48], image[0])
    np.testing.assert_array_equal(boxed[0, 48:], 0.0)


def test_masks_are_nearest_and_zero_padded():
    mask = np.zeros((30, 90), np.uint8)
    mask[:, 45:] = 1
    boxed = letterbox_mask(mask, 60)
    assert boxed.shape == (60, 60) and boxed.dtype == np.uint8 and set(np.unique(boxed)) == {0, 1}
    assert not boxed[:20].any() and not boxed[40:].any()  # the padding band is background
    np.testing.assert_array_equal(boxed[20:40, :30], 0)
    np.testing.assert_array_equal(boxed[20:40, 30:], 1)
    np.testing.assert_array_equal(letterbox_mask(np.ones((60, 60), np.uint8), 60), 1)


@pytest.mark.parametrize("call", [
    lambda: letterbox(np.zeros((5, 5)), 64),
    lambda: letterbox(np.zeros((1, 0, 5)), 64),
    lambda: letterbox_mask(np.zeros((1, 5, 5)), 64),
    lambda: unletterbox(np.zeros((1, 32, 32)), letterbox_box(10, 10, 64)),
    lambda: letterbox_box(10, 10, 0),
])
def test_bad_shapes_are_one_line_errors(call):
    with pytest.raises(R2UNetError) as exc:
        call()
    assert "\n" not in str(exc.value)


def test_geometry_and_postprocess_are_torch_free():
    probe = "import sys; import src_models.geometry, src_models.postprocess; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
