"""Connected components and Otsu's threshold in numpy alone, for the start-up path.

``scipy.ndimage`` and ``skimage.filters`` cost about 0.4-0.6 s to import (scipy parses every
function's docstring at import), which a fresh ``r2unet predict`` paid for the one field-of-view
estimate of its first image: more than half a warm DRIVE image. The estimate runs on a copy of
at most 512 x 512 pixels, where a run-length union-find is exact and takes milliseconds.
Masks of full-size images (the post-processing) still use scipy.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, first column and end column (exclusive) of every run of True in a 2D ``mask``."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # row-major order: the k-th end closes the k-th start
    return rows, starts, ends


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels 1..N of the 4-connected components of a 2D boolean ``mask`` (0 = background), as
    ``scipy.ndimage.label`` numbers them (in order of their first pixel), and N."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"label takes a 2D mask, got shape {mask.shape}")
    rows, starts, ends = _runs(mask)
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for y in range(1, mask.shape[0]):
        above, here = range(row_first[y - 1], row_first[y]), range(row_first[y], row_first[y + 1])
        if not above or not here:
            continue
        j = above.start
        for i in here:  # both rows' runs are sorted: one merge-like pass finds every overlap
            while j < above.stop and ends[j] <= starts[i]:
                j += 1
            k = j
            while k < above.stop and starts[k] < ends[i]:
                a, b = root(i), root(k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
    roots = np.array([root(i) for i in range(len(rows))], dtype=np.int64)
    unique, numbered = np.unique(roots, return_inverse=True)  # roots are each component's first run
    labels = np.zeros(mask.shape, dtype=np.int32)
    for run, value in enumerate(numbered + 1):
        labels[rows[run], starts[run] : ends[run]] = value
    return labels, len(unique)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the border filled in
    (4-connected background, like ``scipy.ndimage.binary_fill_holes``)."""
    mask = np.asarray(mask, dtype=bool)
    background, count = label(~mask)
    if count == 0:
        return mask.copy()
    # a lookup table over the labels, not np.unique + np.isin: np.unique imports numpy.ma on its
    # first call (17-27 ms of a fresh process's first image, which estimates the FOV through here)
    touches = np.zeros(count + 1, dtype=bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        touches[edge] = True
    touches[0] = False  # 0 is the mask itself
    return ~touches[background]


def percentiles(values: np.ndarray, qs: Any) -> np.ndarray:
    """``np.percentile(values, qs)`` of finite ``values`` (its default, linear method) from one
    ``np.partition``, as float64 (numpy's numbers; for float32 input, to float32 rounding).
    np.percentile imports numpy.ma on its first call: 8 ms of every fresh process's first image."""
    a = np.asarray(values).ravel()
    if a.size == 0:
        raise ValueError("percentiles of an empty array")
    q = np.atleast_1d(np.asarray(qs, dtype=np.float64))
    if np.any((q < 0) | (q > 100)):
        raise ValueError("percentiles must lie in 0..100")
    position = q / 100.0 * (a.size - 1)
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, a.size - 1)
    part = np.partition(a, sorted(set(below.tolist()) | set(above.tolist())))
    low, high, t = part[below].astype(np.float64), part[above].astype(np.float64), position - below
    diff = high - low
    out = np.where(t >= 0.5, high - diff * (1 - t), low + diff * t)  # numpy's _lerp
    return out if np.ndim(qs) else out[0]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` on a ``bins`` histogram (the centre of the bin that best
    splits the two classes, as ``skimage.filters.threshold_otsu`` gives it)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if low == high:
        return low
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centres) / np.maximum(weight1, 1)
    mean2 = (np.cumsum((counts * centres)[::-1]) / np.maximum(weight2[::-1], 1))[::-1]
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[int(np.argmax(variance))])


__all__ = ["fill_holes", "label", "otsu_threshold"]
