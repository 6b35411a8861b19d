"""Metrics, bootstrap intervals and threshold choice, against cases worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_datasets.errors import CxrError
from cxr_model.evaluate import (
    METRICS,
    choose_threshold,
    format_metrics,
    metrics_from_probs,
    roc_auc,
    roc_points,
)

# 3 NORMAL, 5 PNEUMONIA. At threshold 0.5: predictions 0 0 1 | 0 1 1 1 1 -> tn 2, fp 1, fn 1, tp 4.
LABELS = np.array([0, 0, 0, 1, 1, 1, 1, 1])
PROBS = np.array([0.1, 0.4, 0.6, 0.3, 0.7, 0.8, 0.9, 0.55])


def test_point_metrics_match_hand_computed_case():
    m = metrics_from_probs(LABELS, PROBS, threshold=0.5, n_boot=200, seed=0)
    assert m["confusion_matrix"] == [[2, 1], [1, 4]]
    expected = {
        "accuracy": 6 / 8,
        "sensitivity": 4 / 5,
        "specificity": 2 / 3,
        "precision": 4 / 5,
        "f1": 2 * 4 / (2 * 4 + 1 + 1),
        # positives beat 1 + 3 + 3 + 3 + 2 of the 15 (positive, negative) pairs
        "roc_auc": 12 / 15,
    }
    for name, value in expected.items():
        assert m[name]["value"] == pytest.approx(value), name
    assert (m["n"], m["threshold"], m["prevalence"]) == (8, 0.5, pytest.approx(5 / 8))


def test_a_probability_equal_to_the_threshold_is_called_pneumonia():
    m = metrics_from_probs([0, 1], [0.5, 0.5], threshold=0.5, n_boot=10)
    assert m["confusion_matrix"] == [[0, 1], [0, 1]]


def test_auc_counts_ties_as_one_half():
    # pairs (pos, neg): (.5,.5) tie -> 0.5, (.5,.2) 1, (.8,.5) 1, (.8,.2) 1  => 3.5 / 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.8]) == pytest.approx(0.875)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.3] * 4) == 0.5


def test_auc_matches_brute_force_pair_count_with_many_ties():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    probs = np.round(rng.random(400) * 0.5 + 0.3 * labels, 2)  # rounded: many ties
    pos, neg = probs[labels == 1], probs[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(labels, probs) == pytest.approx(wins / (len(pos) * len(neg)))


def test_undefined_metrics_are_nan_not_errors():
    m = metrics_from_probs([0, 0, 0], [0.1, 0.2, 0.3], threshold=0.5, n_boot=50)
    assert math.isnan(m["roc_auc"]["value"]) and math.isnan(m["sensitivity"]["value"])
    assert math.isnan(m["precision"]["value"])  # nothing called PNEUMONIA
    assert m["specificity"]["value"] == 1.0 and m["accuracy"]["value"] == 1.0


def test_roc_points_run_from_origin_to_corner_one_per_distinct_score():
    fpr, tpr, thresholds = roc_points(LABELS, PROBS)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.isinf(thresholds[0]) and len(thresholds) == len(set(PROBS)) + 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(LABELS, PROBS))


def test_bootstrap_interval_contains_point_value_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1)
    a = metrics_from_probs(labels, probs, threshold=0.5, n_boot=1000, seed=7)
    b = metrics_from_probs(labels, probs, threshold=0.5, n_boot=1000, seed=7)
    c = metrics_from_probs(labels, probs, threshold=0.5, n_boot=1000, seed=8)
    for name in METRICS:
        m = a[name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name
        assert m["ci_high"] - m["ci_low"] < 0.3, name  # n = 300: intervals of a few points, not [0, 1]
        assert a[name] == b[name]
    assert any(a[name]["ci_low"] != c[name]["ci_low"] for name in METRICS)
    assert a["bootstrap"]["n_boot"] == 1000 and a["bootstrap"]["skipped"]["roc_auc"] == 0


def test_vectorised_bootstrap_equals_a_plain_loop_over_resamples():
    # Same generator, same draws: the count-matrix arithmetic must equal scoring each resample.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    probs = np.round(rng.random(60), 1)
    n_boot, seed = 200, 5
    draws = np.random.default_rng(seed).integers(0, 60, size=(n_boot, 60))
    aucs = np.array([roc_auc(labels[d], probs[d]) for d in draws])
    accs = np.array([np.mean((probs[d] >= 0.5) == labels[d]) for d in draws])
    m = metrics_from_probs(labels, probs, threshold=0.5, n_boot=n_boot, seed=seed)
    assert m["roc_auc"]["ci_low"] == pytest.approx(np.percentile(aucs, 2.5))
    assert m["roc_auc"]["ci_high"] == pytest.approx(np.percentile(aucs, 97.5))
    assert m["accuracy"]["ci_low"] == pytest.approx(np.percentile(accs, 2.5))


def test_resamples_with_one_class_are_skipped_for_auc_and_counted():
    labels = np.array([1] + [0] * 11)  # one positive: ~35% of resamples draw none
    probs = np.linspace(0.9, 0.0, 12)
    m = metrics_from_probs(labels, probs, threshold=0.5, n_boot=1000, seed=0)
    skipped = m["bootstrap"]["skipped"]
    assert 200 < skipped["roc_auc"] < 500
    assert skipped["sensitivity"] == skipped["roc_auc"] and skipped["accuracy"] == 0
    assert m["roc_auc"]["ci_low"] == 1.0  # every usable resample is perfectly separated


def test_youden_threshold_hand_computed():
    # ROC cut by cut (score: tpr, fpr): .9 .2/0  .8 .4/0  .7 .6/0  .6 .6/.33  .55 .8/.33 ...
    # J is largest (0.6) when .7 is the lowest score called positive; halfway to .6 below it.
    t = choose_threshold(LABELS, PROBS, method="youden")
    assert t == pytest.approx(0.65)
    m = metrics_from_probs(LABELS, PROBS, threshold=t, n_boot=10)
    assert (m["sensitivity"]["value"], m["specificity"]["value"]) == (pytest.approx(0.6), 1.0)


def test_sensitivity_threshold_is_the_highest_reaching_the_target():
    assert choose_threshold(LABELS, PROBS, method="sensitivity", target=0.8) == pytest.approx((0.55 + 0.4) / 2)
    assert choose_threshold(LABELS, PROBS, method="sensitivity", target=0.95) == pytest.approx((0.3 + 0.1) / 2)
    t = choose_threshold(LABELS, PROBS, method="sensitivity", target=0.95)
    assert metrics_from_probs(LABELS, PROBS, threshold=t, n_boot=10)["sensitivity"]["value"] == 1.0


def test_youden_ties_go_to_the_lower_threshold():
    # cuts .8 (tpr .5, fpr 0) and .35 (tpr 1, fpr .5) both give J = 0.5: take .35 (more sensitive)
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx((0.35 + 0.1) / 2)


def test_choose_threshold_rejects_bad_input():
    with pytest.raises(CxrError, match="both"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(CxrError, match="unknown threshold method"):
        choose_threshold(LABELS, PROBS, method="f1")
    with pytest.raises(ValueError):
        metrics_from_probs([0, 1], [0.5])


def test_format_metrics_lists_every_metric_per_split():
    m = metrics_from_probs(LABELS, PROBS, threshold=0.5, n_boot=50)
    text = format_metrics({"val": m, "test": m})
    assert "val (n=8)" in text and "test (n=8)" in text
    for name in METRICS:
        assert name in text
    assert "0.800 [" in text
