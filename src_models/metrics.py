"""Segmentation metrics of the R2U-Net paper: SE, SP, ACC, F1/Dice, Jaccard and exact ROC AUC.

This module owns the evaluation protocol: confusion counts at a threshold, optionally inside a
field-of-view (FOV) mask, per image and pooled over a set (DRIVE's protocol pools every FOV
pixel of every test image). Everything is vectorised numpy: ``bincount`` for the confusion
counts, one sort for the AUC (exact, with ties handled as the trapezoidal ROC, the same value as
scikit-learn's ``roc_auc_score``).

Definitions (TP, FP, TN, FN counted on pixels)::

    SE  = TP / (TP + FN)            sensitivity, recall
    SP  = TN / (TN + FP)            specificity
    ACC = (TP + TN) / all
    F1  = 2 TP / (2 TP + FP + FN)   = Dice
    JS  = TP / (TP + FP + FN)       Jaccard similarity
    AUC = area under the ROC curve of the probabilities (threshold-free)

A ratio whose denominator is 0 is reported as NaN (e.g. SE of an image without foreground).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import R2UNetError
from .settings import DEFAULT_THRESHOLD

METRIC_NAMES = ("F1", "SE", "SP", "ACC", "JS", "AUC")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


@dataclass(frozen=True)
class Confusion:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    def metrics(self) -> dict[str, float]:
        total = self.tp + self.fp + self.tn + self.fn
        return {
            "F1": _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "SE": _ratio(self.tp, self.tp + self.fn),
            "SP": _ratio(self.tn, self.tn + self.fp),
            "ACC": _ratio(self.tp + self.tn, total),
            "JS": _ratio(self.tp, self.tp + self.fp + self.fn),
        }


def _flatten(prob: np.ndarray, target: np.ndarray, fov: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    prob, target = np.asarray(prob), np.asarray(target)
    if prob.shape != target.shape:
        raise R2UNetError(f"prediction shape {prob.shape} differs from the mask shape {target.shape}")
    if fov is not None:
        fov = np.asarray(fov)
        if fov.shape != target.shape:
            raise R2UNetError(f"field-of-view mask shape {fov.shape} differs from the mask shape {target.shape}")
        keep = fov.astype(bool)
        return prob[keep].astype(np.float64, copy=False), target[keep].astype(bool)
    return prob.ravel().astype(np.float64, copy=False), target.ravel().astype(bool)


def _count(predicted: np.ndarray, target: np.ndarray) -> Confusion:
    """Confusion counts of flat boolean ``predicted`` against flat boolean ``target``."""
    counts = np.bincount(predicted.astype(np.int64) * 2 + target, minlength=4)
    return Confusion(tp=int(counts[3]), fp=int(counts[2]), tn=int(counts[0]), fn=int(counts[1]))


def confusion(prob: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None, threshold: float = DEFAULT_THRESHOLD) -> Confusion:
    """Confusion counts of ``prob >= threshold`` against the binary ``target`` inside ``fov``."""
    p, t = _flatten(prob, target, fov)
    return _count(p >= threshold, t)


def roc_auc(prob: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None) -> float:
    """Exact area under the ROC curve (ties as trapezoids); NaN if only one class is present."""
    p, t = _flatten(prob, target, fov)
    positives = int(t.sum())
    negatives = t.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(-p, kind="stable")
    p_sorted, t_sorted = p[order], t[order]
    # last index of every run of equal scores: one ROC point per distinct threshold
    ends = np.r_[np.flatnonzero(np.diff(p_sorted)), p_sorted.size - 1]
    tps = np.cumsum(t_sorted)[ends].astype(np.float64)
    fps = (ends + 1) - tps
    tpr = np.r_[0.0, tps / positives]
    fpr = np.r_[0.0, fps / negatives]
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def segmentation_metrics(prob: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """All of :data:`METRIC_NAMES` for one image (or one already pooled set of pixels)."""
    result = confusion(prob, target, fov, threshold).metrics()
    result["AUC"] = roc_auc(prob, target, fov)
    return result


@dataclass
class MetricAccumulator:
    """Pools pixels over a set of images: counts add up, AUC is computed over all kept pixels.

    Memory: one float64 and one bool per FOV pixel (DRIVE test set: about 40 MB).
    """

    threshold: float = DEFAULT_THRESHOLD
    counts: Confusion = field(default_factory=Confusion)
    _probs: list[np.ndarray] = field(default_factory=list, repr=False)
    _targets: list[np.ndarray] = field(default_factory=list, repr=False)

    def add(self, prob: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None,
            predicted: np.ndarray | None = None) -> dict[str, float]:
        """Add one image; returns its own metrics.

        ``predicted``, a 0/1 mask of ``target``'s shape (e.g. thresholded and post-processed),
        replaces ``prob >= threshold`` for the thresholded metrics; AUC always comes from ``prob``.
        """
        p, t = _flatten(prob, target, fov)
        hits = p >= self.threshold if predicted is None else _flatten(predicted, target, fov)[0] > 0
        counts = _count(hits, t)
        self.counts = self.counts + counts
        self._probs.append(p)
        self._targets.append(t)
        one = counts.metrics()
        one["AUC"] = roc_auc(p, t)
        return one

    def pooled(self) -> dict[str, float]:
        if not self._probs:
            raise R2UNetError("no images were evaluated")
        result = self.counts.metrics()
        result["AUC"] = roc_auc(np.concatenate(self._probs), np.concatenate(self._targets))
        return result

    def confusion_dict(self) -> dict[str, int]:
        return asdict(self.counts)


def mean_metrics(per_image: list[dict[str, float]]) -> dict[str, float]:
    """The mean over images of each of :data:`METRIC_NAMES`, leaving out an image's NaN (undefined)
    values; NaN where no image has one (ISIC 2017's lesion segmentation ranks by the mean per-image
    Jaccard, where the pooled figures weigh large images more)."""
    means = {}
    for name in METRIC_NAMES:
        values = [m[name] for m in per_image if name in m and not np.isnan(m[name])]
        means[name] = float(np.mean(values)) if values else float("nan")
    return means
