"""The one tiler: tiling geometry, then sliding-window inference with Gaussian blending. Torch-free.

This module owns turning an image of any size into class probabilities through any
``predictor`` (numpy in, numpy out), MONAI style: the geometry is computed first
(:func:`tile_grid`: the tile size and the start offsets per axis), then the loop runs it.

- Overlaps are pixels everywhere inside. The one conversion from a fraction of the tile (the
  MONAI-shaped ``overlap`` argument of :func:`sliding_window_inference`) happens once, in
  :func:`tile_grid`: ``round(overlap * tile)``.
- :func:`sliding_window_inference`: tiles of at most ``roi_size`` laid on a regular grid, run in
  batches of ``sw_batch_size`` through ``predictor``, blended with a Gaussian weight
  (``mode="gaussian"``) or a flat one (``"constant"``). Tiles are processed one row of tiles at a
  time and finished rows are written to ``out`` at once, so the working memory is
  ``(K + 1) x tile_h x W`` floats whatever the image height; the input is read band by band
  (``inputs[:, y0:y1]``), so dask and memory-mapped arrays stay lazy.

The image is padded by edge replication to the network's size multiple before tiling, exactly
as the network pads a whole image, so a single-tile run equals ``model(image)`` and a tiled run
differs from it only by the tiles' interior borders, which the Gaussian weights suppress.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from .errors import CancelledError, R2UNetError
from .settings import DEFAULT_OVERLAP, MAX_OVERLAP, check_overlap, padded_size

Progress = Callable[[float], None]
ShouldStop = Callable[[], bool]
Predictor = Callable[[np.ndarray], np.ndarray]

# A tile advances by at least this fraction of itself: MAX_OVERLAP's decimal value, exactly
# (rational arithmetic, so 0.95 of a 40-pixel tile is 38 pixels, not 37.99999...).
_MIN_STRIDE = 1 - Fraction(str(MAX_OVERLAP))


def gaussian_weight(shape: tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """``(h, w)`` float32 separable Gaussian centred on the tile, peak 1, never zero.

    The floor (1e-3) is applied per axis, not to the product: along an image border every tile
    has the same small weight in one axis, and the other axis must still decide between them.
    """
    axes = []
    for n in shape:
        coords = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        axis = np.exp(-0.5 * (coords / sigma) ** 2)
        axes.append(np.maximum(axis / axis.max(), 1e-3))
    return np.outer(axes[0], axes[1]).astype(np.float32)


# -- geometry: one axis ----------------------------------------------------------------------
def max_overlap_pixels(tile: int) -> int:
    """The largest overlap a ``tile``-pixel tile may have: :data:`MAX_OVERLAP` of it, rounded up."""
    return tile - math.floor(tile * _MIN_STRIDE)


def _stride(tile: int, overlap_px: int, multiple: int) -> int:
    """How far the next tile starts: the tile less its overlap, down to the pooling grid."""
    return max(multiple, (tile - overlap_px) // multiple * multiple)


def tile_starts(size: int, tile: int, overlap_px: int, multiple: int = 1) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` with at least ``overlap_px``
    pixels of overlap.

    Starts are multiples of ``multiple`` (``size`` and ``tile`` must be too), so every tile sees
    the same pooling grid as the whole image; the last tile ends exactly at ``size``.
    """
    if tile >= size:
        return [0]
    count = math.ceil((size - tile) / _stride(tile, overlap_px, multiple)) + 1
    starts = [round(i * (size - tile) / (count - 1) / multiple) * multiple for i in range(count)]
    return sorted(set(starts))


def balanced_tile(size: int, max_tile: int, overlap_px: int, multiple: int = 1) -> int:
    """The tile length along one axis: as few tiles of at most ``max_tile`` as cover ``size`` with
    ``overlap_px`` of overlap, made equal and as short as they can be.

    A fixed tile wastes work where the last one sticks out: 1424 pixels in 1024-pixel tiles
    computes 2048 pixels, in two balanced 808-pixel tiles (192 overlap) 1616. ``size``,
    ``max_tile`` and the result are multiples of ``multiple``.
    """
    if max_tile >= size:
        return size
    overlap_px = min(overlap_px, max_tile - multiple)
    count = math.ceil((size - max_tile) / _stride(max_tile, overlap_px, multiple)) + 1
    tile = padded_size(-(-(size - overlap_px) // count) + overlap_px, multiple)
    while tile < max_tile and tile + (count - 1) * _stride(tile, overlap_px, multiple) < size:
        tile += multiple
    return min(max_tile, tile)


def tile_layout(size: int, max_tile: int, overlap_px: int, multiple: int = 1) -> tuple[int, list[int]]:
    """One axis of the tiling: the evened-out tile length and the tiles' start offsets."""
    tile = balanced_tile(size, max_tile, overlap_px, multiple)
    return tile, tile_starts(size, tile, min(overlap_px, max_overlap_pixels(tile)), multiple)


# -- geometry: the image ---------------------------------------------------------------------
@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one ``(H, W)`` image go: computed first, then run by the loop."""

    shape: tuple[int, int]  # the image's (H, W)
    padded: tuple[int, int]  # (H, W) edge-padded to the size multiple
    tile: tuple[int, int]  # (th, tw), evened out so that no tile sticks out
    ys: tuple[int, ...]  # start rows of the tile rows
    xs: tuple[int, ...]  # start columns of the tile columns

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)


def tile_grid(
    height: int, width: int, roi_size: int | tuple[int, int], size_multiple: int = 1, *,
    overlap: float = DEFAULT_OVERLAP, overlap_px: int | None = None,
) -> TileGrid:
    """The tiling of a ``height x width`` image by tiles of at most ``roi_size``.

    ``roi_size`` is clipped to the padded image and rounded down to ``size_multiple``. The
    overlap is ``overlap_px`` pixels when given, else ``overlap`` as a fraction of that largest
    tile, converted here, once, to pixels per axis (``round(overlap * tile)``).
    """
    check_overlap(overlap)
    padded = (padded_size(height, size_multiple), padded_size(width, size_multiple))
    roi = (roi_size, roi_size) if isinstance(roi_size, int) else tuple(roi_size)
    largest = [max(size_multiple, min(r, p) // size_multiple * size_multiple) for r, p in zip(roi, padded)]
    (th, ys), (tw, xs) = (
        tile_layout(p, t, round(overlap * t) if overlap_px is None else overlap_px, size_multiple)
        for p, t in zip(padded, largest)
    )
    return TileGrid((height, width), padded, (th, tw), tuple(ys), tuple(xs))


def _axis_weights(size: int, tile: int, starts: tuple[int, ...], gaussian: bool) -> list[np.ndarray]:
    """Per-tile 1D blending weights along one axis.

    Inside the image a tile's outer ``margin`` pixels (half the smallest overlap) get weight 0,
    so no pixel takes any part of its value from a tile whose border is near it: borders see
    zero padding where the whole image has real context. Sides on the image border keep their
    weight (the whole image has the same border there).
    """
    overlaps = [tile - (b - a) for a, b in zip(starts, starts[1:])]
    margin = max(0, min(overlaps) // 2) if overlaps else 0
    base = gaussian_weight((1, tile))[0] if gaussian and len(starts) > 1 else np.ones(tile, np.float32)
    weights = []
    for start in starts:
        w = base.copy()
        if margin and start > 0:
            w[:margin] = 0.0
        if margin and start + tile < size:
            w[tile - margin :] = 0.0
        weights.append(w)
    return weights


def _read_band(inputs: Any, y0: int, y1: int, padded_w: int) -> np.ndarray:
    """Rows ``y0:y1`` of ``inputs`` ``(C, H, W)``, edge-replicated past the bottom/right border."""
    height, width = inputs.shape[-2:]
    band = np.asarray(inputs[:, y0 : min(y1, height), :])
    pad_h, pad_w = y1 - y0 - band.shape[1], padded_w - width
    if pad_h > 0 or pad_w > 0:
        band = np.pad(band, ((0, 0), (0, max(pad_h, 0)), (0, max(pad_w, 0))), mode="edge")
    return band


# -- the loop --------------------------------------------------------------------------------
def sliding_window_inference(
    inputs: Any,
    roi_size: int | tuple[int, int],
    sw_batch_size: int,
    predictor: Predictor,
    overlap: float = DEFAULT_OVERLAP,
    mode: str = "gaussian",
    *,
    overlap_px: int | None = None,
    size_multiple: int = 1,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    out: Any = None,
) -> Any:
    """Blend ``predictor`` over tiles of ``inputs``; returns ``out`` ``(K, H, W)`` float32.

    Args:
        inputs: ``(C, H, W)`` array-like (numpy, dask, memmap); read one band of rows at a time.
        roi_size: the largest tile height/width (clipped to the padded image, rounded down to
            ``size_multiple``); tiles are then evened out so that none sticks out (:func:`balanced_tile`).
        sw_batch_size: tiles per ``predictor`` call.
        predictor: ``(N, C', h, w)`` float32 -> ``(N, K, h, w)`` float32 probabilities.
        overlap: fraction of ``roi_size`` shared with a neighbour (at least that many pixels),
            in ``[0, MAX_OVERLAP]``.
        mode: ``gaussian`` or ``constant`` blending.
        overlap_px: the overlap in pixels instead of ``overlap`` (the Segmenter's 192).
        size_multiple: the image is edge-padded to a multiple of this (the network's).
        transform: applied to each raw band before tiling (pointwise preprocessing).
        progress: called with the fraction of tiles done, in ``(0, 1]``.
        should_stop: polled between batches; when it returns True, :class:`CancelledError`.
        out: optional preallocated ``(K, H, W)`` float32 target (e.g. a memmap, a ``LabelSink``).
    """
    if mode not in ("gaussian", "constant"):
        raise R2UNetError(f"blend mode {mode!r} is unknown; use gaussian or constant")
    if sw_batch_size < 1:
        raise R2UNetError(f"batch size {sw_batch_size} must be >= 1")
    _, height, width = inputs.shape
    grid = tile_grid(height, width, roi_size, size_multiple, overlap=overlap, overlap_px=overlap_px)
    return run_grid(inputs, grid, sw_batch_size, predictor, mode, transform=transform, progress=progress,
                    should_stop=should_stop, out=out)


def run_grid(
    inputs: Any, grid: TileGrid, sw_batch_size: int, predictor: Predictor, mode: str = "gaussian", *,
    transform: Callable[[np.ndarray], np.ndarray] | None = None, progress: Progress | None = None,
    should_stop: ShouldStop | None = None, out: Any = None,
) -> Any:
    """The loop of :func:`sliding_window_inference` over a precomputed :class:`TileGrid`."""
    (height, width), (th, tw), padded_w = grid.shape, grid.tile, grid.padded[1]
    ys, xs = grid.ys, grid.xs
    wys = _axis_weights(grid.padded[0], th, ys, mode == "gaussian")
    wxs = _axis_weights(padded_w, tw, xs, mode == "gaussian")
    acc: np.ndarray | None = None
    wsum = np.zeros((th, padded_w), dtype=np.float32)
    done = 0
    for row, y0 in enumerate(ys):
        band = _read_band(inputs, y0, y0 + th, padded_w)
        if transform is not None:
            band = transform(band)
        for b in range(0, len(xs), sw_batch_size):
            if should_stop is not None and should_stop():
                raise CancelledError()
            starts = xs[b : b + sw_batch_size]
            batch = np.stack([band[:, :, x0 : x0 + tw] for x0 in starts]).astype(np.float32, copy=False)
            probs = predictor(batch)
            if acc is None:
                acc = np.zeros((probs.shape[1], th, padded_w), dtype=np.float32)
                if out is None:
                    out = np.empty((probs.shape[1], height, width), dtype=np.float32)
            for j, (prob, x0) in enumerate(zip(probs, starts)):
                weight = np.outer(wys[row], wxs[b + j])
                acc[:, :, x0 : x0 + tw] += prob * weight
                wsum[:, x0 : x0 + tw] += weight
            done += len(starts)
            if progress is not None:
                progress(done / grid.count)
        assert acc is not None
        # rows above the next tile row are final: write them out and slide the buffers up
        shift = (ys[row + 1] - y0) if row + 1 < len(ys) else th
        stop = min(y0 + shift, height)
        if stop > y0:
            out[:, y0:stop] = acc[:, : stop - y0, :width] / wsum[None, : stop - y0, :width]
        acc[:, : th - shift], wsum[: th - shift] = acc[:, shift:].copy(), wsum[shift:].copy()
        acc[:, th - shift :], wsum[th - shift :] = 0.0, 0.0
    return out
