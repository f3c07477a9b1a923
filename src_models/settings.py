"""Torch-free defaults and bounds of inference, each defined once.

The CLI's ``--help`` texts and checks, the tiler, the Segmenter and the napari widgets all read
these names; nothing else writes the numbers again.
"""

from __future__ import annotations

from .errors import R2UNetError

DEFAULT_THRESHOLD = 0.5  # probability at or above which a pixel is foreground (binary models)
THRESHOLD_RANGE = (0.0, 1.0)

MAX_OVERLAP = 0.95  # largest tile overlap, as a fraction of the tile
DEFAULT_OVERLAP = 0.25  # sliding_window_inference's default (a fraction of the tile)
# The Segmenter's default overlap, in pixels whatever the tile. Measured with r2unet-drive on
# skimage's retina (1856^2 and 1920^2 crops, two 1024-pixel tiles per axis, against the whole
# image): 128 pixels -> max |difference| 8.9e-3 and 7 flipped mask pixels, 160 -> 2.6e-3,
# 192 -> 8.9e-4 and none (tests/test_inference.py checks it).
AUTO_OVERLAP_PIXELS = 192
AUTO_WHOLE_IMAGE_PIXELS = 1536 * 1536  # images up to this size run as one tile (no overlap to recompute)
AUTO_TILE = 1280  # larger ones (or where memory is short): tiles of at most this side, evened out
MIN_TILE = 128  # the out-of-memory retries halve the tile down to this
MIN_USER_TILE = 16  # a tile asked for explicitly must be at least this


def padded_size(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple`` (how the network pads an image)."""
    return -(-size // multiple) * multiple


def check_threshold(threshold: float) -> float:
    low, high = THRESHOLD_RANGE
    if not low <= threshold <= high:
        raise R2UNetError(f"threshold={threshold} must be in [{low:g}, {high:g}]")
    return threshold


def check_overlap(overlap: float) -> float:
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise R2UNetError(f"overlap={overlap} must be in [0, {MAX_OVERLAP:g}] (a fraction of the tile)")
    return overlap
