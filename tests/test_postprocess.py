"""Card post-processing: largest component(s) and hole filling on synthetic masks."""

from __future__ import annotations

import numpy as np
import pytest

from src_models.model_card import Postprocess
from src_models.postprocess import apply_postprocess


def _blobs() -> np.ndarray:
    mask = np.zeros((40, 40), np.uint8)
    mask[2:20, 2:20] = 1  # 324 pixels, with a hole
    mask[8:12, 8:12] = 0
    mask[25:35, 25:35] = 1  # 100
    mask[30:33, 2:5] = 1  # 9
    mask[0, 39] = 1  # 1
    return mask


def test_none_returns_the_mask_unchanged():
    mask = _blobs()
    assert apply_postprocess(mask, Postprocess()) is mask


def test_largest_component_keeps_only_the_biggest():
    out = apply_postprocess(_blobs(), Postprocess("largest_component"))
    assert out.dtype == np.uint8 and out.sum() == 324 - 16 and out[2:20, 2:20].sum() == out.sum()


@pytest.mark.parametrize("count, total", [(2, 308 + 100), (3, 308 + 109), (4, 418), (9, 418)])
def test_largest_components_keeps_n(count, total):
    assert apply_postprocess(_blobs(), Postprocess("largest_components", count)).sum() == total


def test_fill_holes_alone_and_combined():
    filled = apply_postprocess(_blobs(), Postprocess(fill_holes=True))
    assert filled[8:12, 8:12].all() and filled.sum() == 418 + 16
    both = apply_postprocess(_blobs(), Postprocess("largest_component", fill_holes=True))
    assert both.sum() == 324


def test_diagonal_neighbours_are_one_component():
    mask = np.eye(6, dtype=np.uint8)
    mask[0, 5] = 1
    out = apply_postprocess(mask, Postprocess("largest_component"))
    np.testing.assert_array_equal(out, np.eye(6, dtype=np.uint8))


def test_stacks_plane_by_plane_and_empty_and_multiclass_untouched():
    stack = np.stack([_blobs(), np.zeros((40, 40), np.uint8)])
    out = apply_postprocess(stack, Postprocess("largest_component"))
    assert out.shape == stack.shape and out[0].sum() == 308 and not out[1].any()
    multi = _blobs() * 2
    assert apply_postprocess(multi, Postprocess("largest_component")) is multi
