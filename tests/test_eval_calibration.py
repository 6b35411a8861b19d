"""Calibration (Brier, ECE), PR curve and AUPRC, DeLong's AUC interval and the operating points,
against cases worked out by hand and against brute-force definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_eval_metrics import LABELS, PROBS  # the hand-computed case: 3 NORMAL, 5 PNEUMONIA

from cxr_model.evaluate import (
    average_precision,
    brier_score,
    calibration_bins,
    choose_operating_points,
    choose_threshold,
    delong_auc,
    format_metrics,
    metrics_from_probs,
    pr_points,
    roc_auc,
    wilson_interval,
)


def test_brier_and_ece_hand_computed():
    labels, probs = [0, 0, 1, 0], [0.05, 0.15, 0.95, 0.85]
    # squared errors .0025 .0225 .0025 .7225 -> mean .1875
    assert brier_score(labels, probs) == pytest.approx(0.1875)
    # one case per bin (0, 1, 9, 8): gaps .05 .15 .05 .85, each weighing 1/4
    cal = calibration_bins(labels, probs)
    assert cal["ece"] == pytest.approx(0.275)
    assert cal["count"] == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert cal["fraction_positive"][8] == 0.0 and cal["fraction_positive"][9] == 1.0
    assert math.isnan(cal["mean_predicted"][3])  # an empty bin has no mean (null in JSON)


def test_ece_bins_pool_cases_and_a_score_of_one_goes_in_the_last_bin():
    # bin 2 holds .2 .25 (labels 0 1): mean .225, observed .5 -> gap .275, weight 2/3;
    # bin 9 holds 1.0 (label 1): gap 0.
    cal = calibration_bins([0, 1, 1], [0.2, 0.25, 1.0])
    assert cal["count"][2] == 2 and cal["count"][9] == 1
    assert cal["ece"] == pytest.approx(2 / 3 * 0.275)
    assert calibration_bins([0, 1], [0.0, 1.0])["ece"] == 0.0  # perfectly calibrated and sure


def test_average_precision_hand_computed_and_with_ties():
    # ranked 1 0 1 0: recall .5 at precision 1, recall 1 at precision 2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]) == pytest.approx((1 + 2 / 3) / 2)
    # LABELS/PROBS ranked: .9 .8 .7 (1 1 1) .6 (0) .55 (1) .4 (0) .3 (1) .1 (0)
    assert average_precision(LABELS, PROBS) == pytest.approx(0.2 * 3 + 0.2 * 4 / 5 + 0.2 * 5 / 7)
    # a tie between a positive and a negative is one threshold: precision 1/2 there
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(average_precision([0, 0], [0.2, 0.4]))


def test_pr_points_one_per_distinct_score_from_the_anchor():
    precision, recall, thresholds = pr_points(LABELS, PROBS)
    assert (precision[0], recall[0], thresholds[0]) == (1.0, 0.0, np.inf)
    assert len(thresholds) == len(set(PROBS)) + 1 and recall[-1] == 1.0
    assert precision[-1] == pytest.approx(5 / 8)  # everything called positive: the prevalence
    assert np.all(np.diff(recall) >= 0)
    # the average precision is the step-wise sum over these points
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(average_precision(LABELS, PROBS))


def test_delong_hand_computed():
    # positives .8 .6, negatives .7 .2: V10 = [1, .5], V01 = [.5, 1]; var = .125/2 + .125/2
    d = delong_auc([1, 1, 0, 0], [0.8, 0.6, 0.7, 0.2])
    assert d["value"] == pytest.approx(0.75) and d["se"] == pytest.approx(math.sqrt(0.125))
    assert d["ci_low"] == pytest.approx(0.75 - 1.959963984540054 * math.sqrt(0.125))
    assert d["ci_high"] == 1.0  # clipped
    assert math.isnan(delong_auc([1, 0, 0], [0.9, 0.1, 0.2])["se"])  # one positive: no variance


def test_delong_equals_the_pairwise_definition_with_ties_and_is_near_the_bootstrap():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 300)
    probs = np.round(np.clip(rng.normal(0.4 + 0.25 * labels, 0.2), 0, 1), 2)  # ties
    pos, neg = probs[labels == 1], probs[labels == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    d = delong_auc(labels, probs)
    assert d["value"] == pytest.approx(roc_auc(labels, probs))
    assert d["se"] == pytest.approx(math.sqrt(var))
    boot = metrics_from_probs(labels, probs, n_boot=2000, seed=0)["roc_auc"]
    assert abs((d["ci_high"] - d["ci_low"]) - (boot["ci_high"] - boot["ci_low"])) < 0.02


def test_wilson_interval_hand_computed():
    low, high = wilson_interval(4, 5)  # p = .8, n = 5, z = 1.96
    z = 1.959963984540054
    centre = (0.8 + z * z / 10) / (1 + z * z / 5)
    half = z / (1 + z * z / 5) * math.sqrt(0.8 * 0.2 / 5 + z * z / 100)
    assert (low, high) == (pytest.approx(centre - half), pytest.approx(centre + half))
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 5)[0] == 0.0


def test_specificity_threshold_is_the_lowest_keeping_the_target():
    # cuts from the top: .9 .8 .7 (fpr 0), .6 (fpr 1/3): spec >= .9 allows down to .7
    assert choose_threshold(LABELS, PROBS, method="specificity", target=0.9) == pytest.approx((0.7 + 0.6) / 2)
    assert choose_threshold(LABELS, PROBS, method="specificity", target=0.6) == pytest.approx((0.55 + 0.4) / 2)
    # the top score is a normal case: no threshold keeps 100% specificity but "nothing positive"
    t = choose_threshold([0, 1, 1], [0.9, 0.5, 0.4], method="specificity", target=1.0)
    assert t > 0.9


def test_operating_points_chosen_on_one_split_are_applied_unchanged_to_another():
    points = choose_operating_points(LABELS, PROBS)
    assert [p["name"] for p in points] == ["sens>=0.95", "sens>=0.9", "spec>=0.9"]
    assert [p["threshold"] for p in points] == [pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.65)]
    other_labels = np.array([0, 1, 0, 1, 1])
    other_probs = np.array([0.1, 0.3, 0.7, 0.66, 0.1])
    m = metrics_from_probs(other_labels, other_probs, n_boot=20, operating_points=points)
    spec_point = m["operating_points"][2]
    assert spec_point["threshold"] == pytest.approx(0.65)  # not re-chosen on this split
    # at .65: positives .3 .66 .1 -> 1 of 3 called; negatives .1 .7 -> 1 of 2 cleared
    assert spec_point["sensitivity"]["count"] == [1, 3] and spec_point["specificity"]["count"] == [1, 2]
    assert spec_point["sensitivity"]["value"] == pytest.approx(1 / 3)
    low, high = wilson_interval(1, 3)
    assert (spec_point["sensitivity"]["ci_low"], spec_point["sensitivity"]["ci_high"]) == (low, high)


def test_metrics_carry_the_new_scores_with_intervals_and_the_table_shows_them():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    points = choose_operating_points(labels, probs)
    m = metrics_from_probs(labels, probs, threshold=0.5, n_boot=500, seed=1, operating_points=points)
    assert m["brier"]["value"] == pytest.approx(brier_score(labels, probs))
    assert m["auprc"]["value"] == pytest.approx(average_precision(labels, probs))
    for name in ("brier", "auprc"):
        assert m[name]["ci_low"] < m[name]["value"] < m[name]["ci_high"], name
    assert m["ece"] == calibration_bins(labels, probs)["ece"]
    assert m["roc_auc_delong"]["value"] == pytest.approx(m["roc_auc"]["value"])
    # bootstrap brier equals scoring each resample directly (same draws)
    draws = np.random.default_rng(1).integers(0, 200, size=(500, 200))
    direct = np.array([np.mean((probs[d] - labels[d]) ** 2) for d in draws])
    assert m["brier"]["ci_low"] == pytest.approx(np.percentile(direct, 2.5))
    aps = np.array([average_precision(labels[d], probs[d]) for d in draws[:100]])
    m100 = metrics_from_probs(labels, probs, n_boot=100, seed=1)
    assert m100["auprc"]["ci_high"] == pytest.approx(np.percentile(aps, 97.5))
    text = format_metrics({"val": m, "test": m})
    for row in ("roc_auc (DeLong CI)", "auprc", "brier", "ece (10 bins)", "sens>=0.95 (t=", "spec>=0.9 (t="):
        assert row in text, row
