"""Torch-free probabilities -> what a user looks at: label masks, foreground and uncertainty maps.

This module owns everything computed from class probabilities ``(..., K, H, W)`` (K = 1 for a
binary model, whose one channel is P(foreground)):

- :func:`probabilities_to_labels`: threshold (binary) or argmax (multi-class) to a uint8 mask;
- :class:`LabelSink`: an ``out`` for the tiler that keeps only the labels, band by band;
- :func:`foreground_probability`: P(foreground) as one map, for any K;
- :func:`predictive_entropy`: where the model is unsure, normalised to [0, 1].
"""

from __future__ import annotations

import numpy as np

from .settings import DEFAULT_THRESHOLD, check_threshold


def probabilities_to_labels(probs: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """``(..., K, H, W)`` -> uint8 ``(..., H, W)``: ``p >= threshold`` for K == 1, argmax otherwise."""
    check_threshold(threshold)
    if probs.shape[-3] == 1:
        return (probs[..., 0, :, :] >= threshold).astype(np.uint8)
    return np.argmax(probs, axis=-3).astype(np.uint8)


class LabelSink:
    """An ``out`` for :func:`~src_models.tiling.sliding_window_inference` / ``Segmenter.predict``
    that keeps labels only.

    Each band of finished rows is thresholded (:func:`probabilities_to_labels`) as it arrives, so
    a huge image never holds its float32 probabilities (4 bytes per class and pixel: 268 MB at
    8192^2); ``labels`` is the uint8 ``(H, W)`` result, the same as thresholding the full array.
    """

    def __init__(self, classes: int, height: int, width: int, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.shape = (classes, height, width)
        self.threshold = check_threshold(threshold)
        self.labels = np.zeros((height, width), dtype=np.uint8)

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        if not isinstance(key, tuple) or len(key) < 2 or key[0] != slice(None):
            raise TypeError("LabelSink takes whole-class row bands: sink[:, y0:y1] = probabilities")
        self.labels[key[1:]] = probabilities_to_labels(value, self.threshold)


def foreground_probability(probs: np.ndarray) -> np.ndarray:
    """``(..., K, H, W)`` -> ``(..., H, W)``: P(vessel) for binary models, 1 - P(background) otherwise."""
    return probs[..., 0, :, :] if probs.shape[-3] == 1 else 1.0 - probs[..., 0, :, :]


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """``(..., K, H, W)`` -> ``(..., H, W)`` float32 in [0, 1]: where the model is unsure.

    The entropy of the predicted class distribution divided by its maximum (log 2 for a binary
    model, log K otherwise): 0 where the model is certain, 1 at p = 0.5. With test-time
    augmentation the probabilities are the mean over the flips, so flips that disagree raise it
    too (the predictive entropy of the ensemble).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[-3] == 1:
        p = np.clip(probs[..., 0, :, :], 1e-7, 1 - 1e-7)
        return (-(p * np.log(p) + (1 - p) * np.log1p(-p)) / np.log(2.0)).astype(np.float32)
    p = np.clip(probs, 1e-7, 1.0)
    return (-(p * np.log(p)).sum(axis=-3) / np.log(probs.shape[-3])).astype(np.float32)
