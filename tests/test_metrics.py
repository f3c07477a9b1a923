"""Metrics agree with scikit-learn on random data, with ties, FOV masks and pooling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, precision_score, recall_score, roc_auc_score

from src_models.errors import R2UNetError
from src_models.metrics import MetricAccumulator, confusion, roc_auc, segmentation_metrics


def _random(seed: int, shape=(64, 80), levels: int | None = None):
    rng = np.random.default_rng(seed)
    target = rng.random(shape) < 0.15
    prob = np.clip(target * 0.35 + rng.random(shape) * 0.7, 0, 1)
    if levels:  # many ties, as in quantised probability maps
        prob = np.round(prob * levels) / levels
    fov = rng.random(shape) < 0.8
    return prob, target, fov


@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, 10), (2, 255), (3, 3)])
def test_agrees_with_sklearn(seed, levels):
    prob, target, fov = _random(seed, levels=levels)
    ours = segmentation_metrics(prob, target, fov, threshold=0.5)
    t, p = target[fov], prob[fov]
    pred = p >= 0.5
    assert ours["AUC"] == pytest.approx(roc_auc_score(t, p), abs=1e-12)
    assert ours["F1"] == pytest.approx(f1_score(t, pred))
    assert ours["SE"] == pytest.approx(recall_score(t, pred))
    assert ours["SP"] == pytest.approx(recall_score(~t, ~pred))
    assert ours["ACC"] == pytest.approx(accuracy_score(t, pred))
    assert ours["JS"] == pytest.approx(jaccard_score(t, pred))
    assert ours["F1"] == pytest.approx(2 * precision_score(t, pred) * ours["SE"] / (precision_score(t, pred) + ours["SE"]))


def test_pooled_equals_metrics_of_the_concatenation():
    acc = MetricAccumulator()
    parts = [_random(s, shape=(30 + s, 40)) for s in range(4)]
    for prob, target, fov in parts:
        one = acc.add(prob, target, fov)
        assert one["AUC"] == pytest.approx(roc_auc_score(target[fov], prob[fov]))
    all_p = np.concatenate([p[f] for p, _, f in parts])
    all_t = np.concatenate([t[f] for _, t, f in parts])
    pooled = acc.pooled()
    assert pooled["AUC"] == pytest.approx(roc_auc_score(all_t, all_p), abs=1e-7)
    assert pooled["F1"] == pytest.approx(f1_score(all_t, all_p >= 0.5))
    assert sum(acc.confusion_dict().values()) == all_t.size


def test_millions_of_pixels_in_one_pass():
    prob, target, _ = _random(5, shape=(2000, 2000), levels=1000)
    assert roc_auc(prob, target) == pytest.approx(roc_auc_score(target.ravel(), prob.ravel()), abs=1e-9)


def test_degenerate_cases():
    empty_truth = np.zeros((5, 5), bool)
    m = segmentation_metrics(np.zeros((5, 5)), empty_truth)
    assert math.isnan(m["SE"]) and math.isnan(m["AUC"]) and m["SP"] == 1.0 and m["ACC"] == 1.0
    perfect = np.eye(5, dtype=bool)
    m = segmentation_metrics(perfect.astype(float), perfect)
    assert m["F1"] == m["JS"] == m["AUC"] == 1.0
    c = confusion(np.array([0.9, 0.1, 0.6, 0.4]), np.array([1, 1, 0, 0]))
    assert (c.tp, c.fn, c.fp, c.tn) == (1, 1, 1, 1)


def test_shape_mismatches_are_errors():
    with pytest.raises(R2UNetError, match="differs from the mask shape"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(R2UNetError, match="field-of-view"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 4)), np.ones((3, 4)))
    with pytest.raises(R2UNetError, match="no images"):
        MetricAccumulator().pooled()
