"""Mask post-processing a model card asks for, torch-free (scipy.ndimage).

:func:`apply_postprocess` applies a :class:`~src_models.model_card.Postprocess` to a binary
``(H, W)`` (or ``(..., H, W)``, plane by plane) mask: keep the largest connected component or
the ``count`` largest (8-connectivity, ties broken by the first in scan order), then fill holes.
``kind == "none"`` without ``fill_holes`` returns the mask unchanged. Multi-class masks are left
as they are (a card's post-processing is for binary tasks: one lesion, two lungs).
"""

from __future__ import annotations

import numpy as np

from .model_card import Postprocess

_EIGHT = np.ones((3, 3), dtype=bool)


def largest_components(mask: np.ndarray, count: int = 1) -> np.ndarray:
    """The ``count`` largest 8-connected components of a 2D binary mask, same dtype."""
    from scipy import ndimage

    labels, found = ndimage.label(mask > 0, structure=_EIGHT)
    if found <= count:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(-sizes, kind="stable")[:count] + 1
    return np.where(np.isin(labels, keep), mask, 0).astype(mask.dtype)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """A 2D binary mask with its enclosed background holes set to 1, same dtype."""
    from scipy import ndimage

    return ndimage.binary_fill_holes(mask > 0).astype(mask.dtype)


def apply_postprocess(mask: np.ndarray, post: Postprocess) -> np.ndarray:
    """``mask`` (``(..., H, W)`` of 0/1) post-processed per 2D plane as ``post`` says."""
    if not post.active or (mask.size and mask.max() > 1):
        return mask
    if mask.ndim > 2:
        return np.stack([apply_postprocess(plane, post) for plane in mask])
    if post.kind != "none":
        mask = largest_components(mask, post.count)
    return fill_holes(mask) if post.fill_holes else mask
