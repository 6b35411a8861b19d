"""Clinical evaluation: metrics with bootstrap intervals, ROC points and the decision threshold.

    from cxr_model import evaluate, choose_threshold, predict_proba
    t = choose_threshold(y_val, predict_proba(model, x_val))          # on VALIDATION only
    metrics = evaluate(model, x_test, y_test, threshold=t)           # test: threshold is an input

Nothing here tunes anything on the data it scores: `evaluate` and `metrics_from_probs` take the
threshold as an argument, and `choose_threshold` is the only function that picks one (callers pass
validation data to it; `cxr_model.pipeline` is the one place that does).

Conventions: label 1 = PNEUMONIA is the positive class; a case is called PNEUMONIA when
P(PNEUMONIA) >= threshold. Metrics that are undefined on the data (e.g. sensitivity without any
positive case) are NaN; `export` writes NaN to JSON as null. Pure numpy: no scikit-learn.
"""
from __future__ import annotations

import numpy as np

from .config import EvalConfig

METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1")
# The order summaries show them in (`cxr search`, RUN/report.md): the ranking metric first.
DISPLAY_ORDER = ("roc_auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
CI_LEVEL = 0.95
# Bootstrap resamples are drawn in chunks so a large test set never needs a huge count matrix.
_MAX_CELLS_PER_CHUNK = 4_000_000


def evaluate(model, images, labels, threshold: float = 0.5, n_boot: int = EvalConfig.n_boot, seed: int = 0) -> dict:
    """Metrics of `model` on (images, labels) at a FIXED threshold (chosen beforehand on validation)."""
    from cxr_model import predict_proba  # the model helper's one prediction function

    probs = predict_proba(model, images)
    return metrics_from_probs(labels, probs, threshold=threshold, n_boot=n_boot, seed=seed)


def metrics_from_probs(labels, probs, threshold: float = 0.5, n_boot: int = EvalConfig.n_boot, seed: int = 0) -> dict:
    """Point metrics plus 95% percentile-bootstrap intervals, from labels and P(PNEUMONIA).

    Returns {metric: {"value", "ci_low", "ci_high"}} for each of METRICS, plus confusion_matrix
    [[tn, fp], [fn, tp]], threshold, n, prevalence, roc {fpr, tpr, thresholds} (for the ROC plot) and
    bootstrap {n_boot, seed, level, skipped}. A resample in which a metric is undefined (only one
    class drawn: no AUC; no predicted positive: no precision) is skipped for that metric only, and
    `skipped` counts how many were; with under half the resamples usable the interval is NaN.
    """
    labels, probs = _check_inputs(labels, probs)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1 (1000 or more for reported intervals), got {n_boot}")
    predicted = probs >= threshold
    point = _metrics_from_counts(np.ones((1, len(labels)), dtype=np.int64), labels, probs, predicted)
    boot = _bootstrap(labels, probs, predicted, n_boot, seed)
    out = {}
    skipped = {}
    for name in METRICS:
        low, high, n_skipped = _percentile_interval(boot[name])
        out[name] = {"value": float(point[name][0]), "ci_low": low, "ci_high": high}
        skipped[name] = n_skipped
    tn, fp, fn, tp = (int(point[k][0]) for k in ("tn", "fp", "fn", "tp"))
    fpr, tpr, roc_thresholds = roc_points(labels, probs)
    out.update(
        confusion_matrix=[[tn, fp], [fn, tp]],
        threshold=float(threshold),
        n=int(len(labels)),
        prevalence=float(labels.mean()),
        roc={"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": roc_thresholds.tolist()},
        bootstrap={"n_boot": int(n_boot), "seed": int(seed), "level": CI_LEVEL, "skipped": skipped},
    )
    return out


def choose_threshold(labels, probs, method: str = "youden", target: float = 0.95) -> float:
    """The decision threshold, chosen on VALIDATION labels and probabilities.

    method="youden": maximise sensitivity + specificity - 1 (ties: the lower threshold, because a
    missed pneumonia costs more than a false alarm). method="sensitivity": the highest threshold
    whose sensitivity is >= `target`, i.e. the best specificity at that sensitivity.
    The threshold returned lies halfway between the lowest score called positive and the next lower
    score, so the validation predictions are exactly those of the chosen ROC point while new cases
    near the boundary are not decided by an exact float tie.
    """
    from datasets.errors import CxrError

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
    else:
        raise CxrError(f"unknown threshold method {method!r}: use 'youden' or 'sensitivity'")
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
    """A plain-text table: one row per metric, one column per split, "value [ci_low, ci_high]"."""
    splits = list(metrics_by_split)
    header = ["metric"] + [f"{s} (n={metrics_by_split[s]['n']})" for s in splits]
    rows = [[name] + [_value_with_ci(metrics_by_split[s][name]) for s in splits] for name in METRICS]
    rows.append(["threshold"] + [f"{metrics_by_split[s]['threshold']:.3f}" for s in splits])
    rows.append(["confusion [[tn, fp], [fn, tp]]"] + [str(metrics_by_split[s]["confusion_matrix"]) for s in splits])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _value_with_ci(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


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
    return {k: np.concatenate([p[k] for p in parts]) for k in METRICS}


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


def _midpoint_below(probs: np.ndarray, cut: float) -> float:
    """Halfway between `cut` and the next lower distinct score (or `cut` itself if none is lower)."""
    lower = probs[probs < cut]
    return float((cut + lower.max()) / 2) if lower.size else cut
