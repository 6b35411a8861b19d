"""Clinical evaluation: metrics with bootstrap intervals, ROC points and the decision threshold.

    from cxr_model import evaluate, choose_threshold, predict_proba
    t = choose_threshold(y_val, predict_proba(model, x_val))          # on VALIDATION only
    metrics = evaluate(model, x_test, y_test, threshold=t)           # test: threshold is an input

Nothing here tunes anything on the data it scores: `evaluate` and `metrics_from_probs` take the
threshold as an argument, and `choose_threshold` is the only function that picks one (callers pass
validation data to it; `cxr_model.finalize` is the one place that does).

Beyond the thresholded metrics, what clinical readers ask for: the Brier score and the expected
calibration error (ECE, with the bins of a reliability diagram), the precision-recall curve and its
area (AUPRC, as average precision), a DeLong 95% interval for the ROC AUC next to the bootstrap one,
and sensitivity/specificity at fixed operating points whose thresholds were chosen on validation
(`choose_operating_points`, then `metrics_from_probs(..., operating_points=...)` on any split).

Conventions: label 1 = PNEUMONIA is the positive class; a case is called PNEUMONIA when
P(PNEUMONIA) >= threshold. Metrics that are undefined on the data (e.g. sensitivity without any
positive case) are NaN; `export` writes NaN to JSON as null. Pure numpy: no scikit-learn.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cxr_datasets.errors import CxrError

from .config import EvalConfig

METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1")
# Threshold-free scores, also with bootstrap intervals: area under the PR curve, Brier score.
SCORES = ("auprc", "brier")
CALIBRATION_BINS = 10  # equal-width bins of P(PNEUMONIA) for the ECE and the reliability diagram
# Operating points (method, target) chosen on validation and reported on every split: two
# screening points (miss at most 5% / 10% of pneumonias) and one confirmation point (at most 10%
# false alarms among normals).
OPERATING_POINTS = (("sensitivity", 0.95), ("sensitivity", 0.90), ("specificity", 0.90))
_Z95 = 1.959963984540054  # standard normal quantile of 0.975
# The order summaries show them in (`cxr search`, RUN/report.md): the ranking metric first.
DISPLAY_ORDER = ("roc_auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
CI_LEVEL = 0.95
# Bootstrap resamples are drawn in chunks so a large test set never needs a huge count matrix.
_MAX_CELLS_PER_CHUNK = 4_000_000


def evaluate(model, images, labels, threshold: float = 0.5, n_boot: int = EvalConfig.n_boot, seed: int = 0,
             operating_points=None) -> dict:
    """Metrics of `model` on (images, labels) at a FIXED threshold (chosen beforehand on validation),
    and at the fixed `operating_points` (also chosen on validation) when given."""
    from cxr_model import predict_proba  # the model helper's one prediction function

    probs = predict_proba(model, images)
    return metrics_from_probs(labels, probs, threshold=threshold, n_boot=n_boot, seed=seed,
                              operating_points=operating_points)


def metrics_from_probs(labels, probs, threshold: float = 0.5, n_boot: int = EvalConfig.n_boot, seed: int = 0,
                       operating_points=None) -> dict:
    """Point metrics plus 95% percentile-bootstrap intervals, from labels and P(PNEUMONIA).

    Returns {metric: {"value", "ci_low", "ci_high"}} for each of METRICS, plus confusion_matrix
    [[tn, fp], [fn, tp]], threshold, n, prevalence, roc {fpr, tpr, thresholds} (for the ROC plot) and
    bootstrap {n_boot, seed, level, skipped}. A resample in which a metric is undefined (only one
    class drawn: no AUC; no predicted positive: no precision) is skipped for that metric only, and
    `skipped` counts how many were; with under half the resamples usable the interval is NaN.
    Also: auprc and brier ({"value", "ci_low", "ci_high"}, bootstrap), roc_auc_delong {"value", "se",
    "ci_low", "ci_high"}, ece and calibration (reliability-diagram bins), pr {precision, recall,
    thresholds}, and operating_points: one entry per point of `operating_points` (from
    `choose_operating_points`, chosen on validation) with sensitivity/specificity at its threshold
    and Wilson 95% intervals.
    """
    labels, probs = _check_inputs(labels, probs)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1 (1000 or more for reported intervals), got {n_boot}")
    predicted = probs >= threshold
    point = _metrics_from_counts(np.ones((1, len(labels)), dtype=np.int64), labels, probs, predicted)
    boot = _bootstrap(labels, probs, predicted, n_boot, seed)
    out: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    for name in METRICS + SCORES:
        low, high, n_skipped = _percentile_interval(boot[name])
        out[name] = {"value": float(point[name][0]), "ci_low": low, "ci_high": high}
        skipped[name] = n_skipped
    tn, fp, fn, tp = (int(point[k][0]) for k in ("tn", "fp", "fn", "tp"))
    fpr, tpr, roc_thresholds = roc_points(labels, probs)
    precision, recall, pr_thresholds = pr_points(labels, probs)
    calibration = calibration_bins(labels, probs)
    out.update(
        confusion_matrix=[[tn, fp], [fn, tp]],
        threshold=float(threshold),
        n=int(len(labels)),
        prevalence=float(labels.mean()),
        roc_auc_delong=delong_auc(labels, probs),
        ece=calibration["ece"],
        calibration=calibration,
        roc={"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": roc_thresholds.tolist()},
        pr={"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": pr_thresholds.tolist()},
        bootstrap={"n_boot": int(n_boot), "seed": int(seed), "level": CI_LEVEL, "skipped": skipped},
    )
    if operating_points:
        out["operating_points"] = [_at_operating_point(labels, probs, op) for op in operating_points]
    return out


def choose_operating_points(labels, probs, points=OPERATING_POINTS) -> list[dict]:
    """[{"name", "method", "target", "threshold"}] for each (method, target), chosen on VALIDATION.

    method "sensitivity": the highest threshold reaching the target sensitivity; "specificity": the
    lowest threshold keeping the target specificity (see choose_threshold).
    """
    chosen = []
    for method, target in points:
        threshold = choose_threshold(labels, probs, method=method, target=target)
        short = "sens" if method == "sensitivity" else "spec"
        chosen.append({"name": f"{short}>={target:g}", "method": method, "target": float(target),
                       "threshold": threshold})
    return chosen


def brier_score(labels, probs) -> float:
    """Mean squared difference between P(PNEUMONIA) and the label (0 = perfect, 0.25 = always 0.5)."""
    labels, probs = _check_inputs(labels, probs)
    return float(np.mean((probs - labels) ** 2))


def calibration_bins(labels, probs, n_bins: int = CALIBRATION_BINS) -> dict:
    """Reliability-diagram bins of P(PNEUMONIA) and the expected calibration error.

    Bin k holds the scores in [k/n, (k+1)/n) (the last also holds 1.0). ECE = sum over bins of
    (cases in bin / N) * |fraction of PNEUMONIA in bin - mean score in bin|. Empty bins have null
    means and weigh nothing.
    """
    labels, probs = _check_inputs(labels, probs)
    index = np.clip(np.floor(probs * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    score_sum = np.bincount(index, weights=probs, minlength=n_bins)
    pos_sum = np.bincount(index, weights=labels.astype(np.float64), minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_score = np.where(count > 0, score_sum / count, np.nan)
        fraction_pos = np.where(count > 0, pos_sum / count, np.nan)
    gaps = np.where(count > 0, np.abs(fraction_pos - mean_score), 0.0)
    ece = float(np.sum(count / len(labels) * gaps))
    return {"ece": ece, "n_bins": int(n_bins), "edges": np.linspace(0, 1, n_bins + 1).tolist(),
            "count": count.tolist(), "mean_predicted": mean_score.tolist(), "fraction_positive": fraction_pos.tolist()}


def pr_points(labels, probs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve: (precision, recall, thresholds), one point per distinct score.

    Point k calls PNEUMONIA every case with score >= thresholds[k] (highest score first); a first
    point (precision 1, recall 0, threshold +inf) anchors the curve, as scikit-learn does.
    """
    labels, probs = _check_inputs(labels, probs)
    order = np.argsort(-probs, kind="stable")
    scores, y = probs[order], labels[order]
    last_of_level = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(y)[last_of_level].astype(np.float64)
    called = (last_of_level + 1).astype(np.float64)
    n_pos = labels.sum()
    recall = tp / n_pos if n_pos else np.full(len(tp), np.nan)
    return np.r_[1.0, tp / called], np.r_[0.0, recall], np.r_[np.inf, scores[last_of_level]]


def average_precision(labels, probs) -> float:
    """AUPRC as average precision: sum over thresholds of (recall gained) * precision there.

    The step-wise sum (scikit-learn's average_precision_score), not the trapezoid, which would
    overstate the area by interpolating precision linearly. NaN without a PNEUMONIA case.
    """
    labels, probs = _check_inputs(labels, probs)
    return float(_ap_from_weights(np.ones((1, len(labels)), dtype=np.int64), labels, probs)[0])


def delong_auc(labels, probs) -> dict:
    """ROC AUC with DeLong's variance (DeLong et al. 1988; midrank form of Sun & Xu 2014) and a
    normal 95% interval clipped to [0, 1]: {"value", "se", "ci_low", "ci_high"}.

    V10[i] = share of negatives a positive i beats (ties 1/2), V01[j] = share of positives above
    negative j; var(AUC) = var(V10) / m + var(V01) / n. NaN where a class has fewer than 2 cases.
    """
    labels, probs = _check_inputs(labels, probs)
    pos, neg = probs[labels == 1], probs[labels == 0]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        auc = roc_auc(labels, probs) if m and n else float("nan")
        return {"value": auc, "se": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    combined = _midranks(np.r_[pos, neg])
    v10 = (combined[:m] - _midranks(pos)) / n
    v01 = 1.0 - (combined[m:] - _midranks(neg)) / m
    auc = float(v10.mean())
    se = float(np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))
    return {"value": auc, "se": se, "ci_low": max(0.0, auc - _Z95 * se), "ci_high": min(1.0, auc + _Z95 * se)}


def wilson_interval(successes: int, total: int) -> tuple[float, float]:
    """Wilson 95% score interval of a proportion (NaN for total 0): sound at 0% and 100% too."""
    if total == 0:
        return float("nan"), float("nan")
    p = successes / total
    denom = 1 + _Z95 ** 2 / total
    centre = (p + _Z95 ** 2 / (2 * total)) / denom
    half = _Z95 / denom * np.sqrt(p * (1 - p) / total + _Z95 ** 2 / (4 * total ** 2))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def choose_threshold(labels, probs, method: str = "youden", target: float = 0.95) -> float:
    """The decision threshold, chosen on VALIDATION labels and probabilities.

    method="youden": maximise sensitivity + specificity - 1 (ties: the lower threshold, because a
    missed pneumonia costs more than a false alarm). method="sensitivity": the highest threshold
    whose sensitivity is >= `target`, i.e. the best specificity at that sensitivity.
    method="specificity": the lowest threshold whose specificity is >= `target`, i.e. the best
    sensitivity at that specificity.
    The threshold returned lies halfway between the lowest score called positive and the next lower
    score, so the validation predictions are exactly those of the chosen ROC point while new cases
    near the boundary are not decided by an exact float tie.
    """

    labels, probs = _check_inputs(labels, probs)
    if labels.min() == labels.max():
        raise CxrError("choosing a threshold needs both NORMAL and PNEUMONIA cases in the validation split")
    fpr, tpr, cut_scores = roc_points(labels, probs)
    # Point 0 of the curve (threshold above every score) calls nothing positive; skip it.
    fpr, tpr, cut_scores = fpr[1:], tpr[1:], cut_scores[1:]
    if method == "youden":
        k = _last_argmax(tpr - fpr)
    elif method == "sensitivity":
        if not 0.0 < target <= 1.0:
            raise CxrError(f"target sensitivity must be in (0, 1], got {target}")
        k = int(np.argmax(tpr >= target - 1e-12))  # the first (highest) cut reaching the target
    elif method == "specificity":
        if not 0.0 < target <= 1.0:
            raise CxrError(f"target specificity must be in (0, 1], got {target}")
        keeps = np.flatnonzero(1.0 - fpr >= target - 1e-12)
        if keeps.size == 0:  # even the highest cut calls a normal case positive
            return _above_all(probs)
        k = int(keeps[-1])  # the last (lowest) cut still keeping the target
    else:
        raise CxrError(f"unknown threshold method {method!r}: use 'youden', 'sensitivity' or 'specificity'")
    return _midpoint_below(probs, float(cut_scores[k]))


def roc_points(labels, probs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: (fpr, tpr, thresholds), one point per distinct score, from (0, 0) to (1, 1).

    Point k calls PNEUMONIA every case with score >= thresholds[k]; point 0 uses +inf (nothing
    positive). Tied scores move the curve diagonally, which is what the rank-based AUC integrates.
    """
    labels, probs = _check_inputs(labels, probs)
    order = np.argsort(-probs, kind="stable")
    scores, y = probs[order], labels[order]
    last_of_level = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(y)[last_of_level]
    fp = (last_of_level + 1) - tp
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    tpr = np.r_[0.0, tp / n_pos] if n_pos else np.full(len(tp) + 1, np.nan)
    fpr = np.r_[0.0, fp / n_neg] if n_neg else np.full(len(fp) + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, scores[last_of_level]]


def roc_auc(labels, probs) -> float:
    """Rank-based ROC AUC (Mann-Whitney U / (n_pos * n_neg)); ties count one half. NaN for one class."""
    labels, probs = _check_inputs(labels, probs)
    return float(_auc_from_weights(np.ones((1, len(labels)), dtype=np.int64), labels, probs)[0])


def format_metrics(metrics_by_split: dict) -> str:
    """A plain-text table: one row per metric, one column per split, "value [ci_low, ci_high]".

    Rows: METRICS (bootstrap 95% intervals), the AUC's DeLong interval, AUPRC and Brier (bootstrap),
    ECE, threshold, confusion matrix, then sensitivity / specificity at each operating point.
    """
    splits = list(metrics_by_split)
    by = metrics_by_split
    header = ["metric"] + [f"{s} (n={by[s]['n']})" for s in splits]
    rows = [[name] + [_value_with_ci(by[s][name]) for s in splits] for name in METRICS]
    if all("roc_auc_delong" in by[s] for s in splits):
        rows.append(["roc_auc (DeLong CI)"] + [_value_with_ci(by[s]["roc_auc_delong"]) for s in splits])
        rows += [[name] + [_value_with_ci(by[s][name]) for s in splits] for name in SCORES]
        rows.append([f"ece ({CALIBRATION_BINS} bins)"] + [_num(by[s]["ece"]) for s in splits])
    rows.append(["threshold"] + [f"{by[s]['threshold']:.3f}" for s in splits])
    rows.append(["confusion [[tn, fp], [fn, tp]]"] + [str(by[s]["confusion_matrix"]) for s in splits])
    for i, op in enumerate(by[splits[0]].get("operating_points", [])):
        rows.append([f"{op['name']} (t={op['threshold']:.3f}): sens"]
                    + [_value_with_ci(by[s]["operating_points"][i]["sensitivity"]) for s in splits])
        rows.append([f"{op['name']} (t={op['threshold']:.3f}): spec"]
                    + [_value_with_ci(by[s]["operating_points"][i]["specificity"]) for s in splits])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _value_with_ci(m: dict) -> str:
    return f"{_num(m['value'])} [{_num(m['ci_low'])}, {_num(m['ci_high'])}]"


def _num(value) -> str:
    # None: a NaN that went through the model card's strict JSON
    return "nan" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------- internals


def _check_inputs(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if labels.shape != probs.shape or labels.size == 0:
        raise ValueError(f"labels and probs must be non-empty and the same length: {labels.shape} vs {probs.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or inf")
    return labels, probs


def _bootstrap(labels, probs, predicted, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Each metric on `n_boot` resamples with replacement, as arrays of length n_boot.

    A resample is represented by how often it draws each case (a row of counts), so every metric of
    every resample is a matrix product or a cumulative sum over the same sorted cases: no Python loop
    over resamples.
    """
    n = len(labels)
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CELLS_PER_CHUNK // n)
    parts = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        draws = rng.integers(0, n, size=(rows, n))
        # Row r's draws become flat indices r * n + i, so one bincount gives every row's counts.
        flat = (draws + np.arange(rows)[:, None] * n).ravel()
        counts = np.bincount(flat, minlength=rows * n).reshape(rows, n)
        parts.append(_metrics_from_counts(counts, labels, probs, predicted))
    return {k: np.concatenate([p[k] for p in parts]) for k in METRICS + SCORES}


def _metrics_from_counts(counts, labels, probs, predicted) -> dict[str, np.ndarray]:
    """Metrics for each row of case weights `counts` [R, N] (all ones = the data as it is)."""
    pos, neg = labels == 1, labels == 0
    tp = counts @ (pos & predicted)
    fn = counts @ (pos & ~predicted)
    fp = counts @ (neg & predicted)
    tn = counts @ (neg & ~predicted)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "precision": tp / (tp + fp),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }
    out["roc_auc"] = _auc_from_weights(counts, labels, probs)
    out["auprc"] = _ap_from_weights(counts, labels, probs)
    out["brier"] = (counts @ (probs - labels) ** 2) / counts.sum(axis=1)
    out.update(tp=tp, fn=fn, fp=fp, tn=tn)
    return out


def _auc_from_weights(counts, labels, probs) -> np.ndarray:
    """Weighted Mann-Whitney AUC per row of `counts`: P(score_pos > score_neg) + P(tie) / 2.

    Cases are sorted once by score and grouped into levels of equal score; per level and row we
    sum the weights of positives and negatives, then each positive beats the negatives of all lower
    levels and ties with half those of its own level.
    """
    order = np.argsort(probs, kind="stable")
    scores = probs[order]
    level_starts = np.r_[0, np.flatnonzero(np.diff(scores)) + 1]
    w = counts[:, order]
    y = labels[order]
    pos = np.add.reduceat(w * y, level_starts, axis=1)
    neg = np.add.reduceat(w * (1 - y), level_starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    n_pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_pairs > 0, wins / np.maximum(n_pairs, 1), np.nan)


def _ap_from_weights(counts, labels, probs) -> np.ndarray:
    """Weighted average precision per row of `counts`, over levels of equal score, highest first.

    At each level the recall gained (its positives' weight / all positives' weight) is multiplied
    by the precision of calling that level and every higher one positive.
    """
    order = np.argsort(-probs, kind="stable")
    scores = probs[order]
    level_starts = np.r_[0, np.flatnonzero(np.diff(scores)) + 1]
    w = counts[:, order]
    y = labels[order]
    pos = np.add.reduceat(w * y, level_starts, axis=1).astype(np.float64)
    called = np.add.reduceat(w, level_starts, axis=1).astype(np.float64)
    cum_pos, cum_called = np.cumsum(pos, axis=1), np.cumsum(called, axis=1)
    n_pos = pos.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(cum_called > 0, cum_pos / cum_called, 0.0)
        return np.where(n_pos > 0, (pos * precision).sum(axis=1) / n_pos, np.nan)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _at_operating_point(labels, probs, op: dict) -> dict:
    """Sensitivity and specificity (Wilson 95% intervals) at an operating point's fixed threshold."""
    called = probs >= op["threshold"]
    tp, n_pos = int((called & (labels == 1)).sum()), int((labels == 1).sum())
    tn, n_neg = int((~called & (labels == 0)).sum()), int((labels == 0).sum())
    out = dict(op)
    for name, hits, total in (("sensitivity", tp, n_pos), ("specificity", tn, n_neg)):
        low, high = wilson_interval(hits, total)
        out[name] = {"value": hits / total if total else float("nan"), "ci_low": low, "ci_high": high,
                     "count": [hits, total]}
    return out


def _percentile_interval(values: np.ndarray) -> tuple[float, float, int]:
    """(low, high, number skipped) of the central CI_LEVEL interval over the defined values."""
    defined = values[np.isfinite(values)]
    skipped = int(values.size - defined.size)
    if defined.size < max(1, values.size // 2):  # too few usable resamples for an honest interval
        return float("nan"), float("nan"), skipped
    tail = (1 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high), skipped


def _last_argmax(values: np.ndarray) -> int:
    """Index of the last maximum (within float noise): along the ROC, the lowest tied threshold."""
    return int(np.flatnonzero(values >= values.max() - 1e-12)[-1])


def _above_all(probs: np.ndarray) -> float:
    """A threshold above every score (nothing called PNEUMONIA), at most 1."""
    top = float(probs.max())
    return top + (1.0 - top) / 2 if top < 1.0 else float(np.nextafter(1.0, 2.0))


def _midpoint_below(probs: np.ndarray, cut: float) -> float:
    """Halfway between `cut` and the next lower distinct score (or `cut` itself if none is lower)."""
    lower = probs[probs < cut]
    return float((cut + lower.max()) / 2) if lower.size else cut
