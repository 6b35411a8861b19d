"""Evaluation plots written as PNG files: learning curves, confusion matrix, ROC with operating point,
precision-recall curve, reliability diagram.

    from cxr_model import plots
    plots.plot_history(history, "run/plots/curves.png")
    plots.plot_confusion_matrix(metrics["confusion_matrix"], "run/plots/confusion_test.png")
    plots.plot_roc(metrics, "run/plots/roc_test.png")
    plots.plot_pr(metrics, "run/plots/pr_test.png")
    plots.plot_reliability(metrics, "run/plots/reliability_test.png")

Figures are built with `matplotlib.figure.Figure` and its Agg canvas, never `pyplot`: no global
figure state, no display needed, safe in Ray workers and threads. Each function returns the path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_datasets.config import CLASS_NAMES  # label 0, 1
from cxr_datasets.figures import new_figure, save_figure
from cxr_model.config import METRIC, MODE

# Curves shown side by side when the history has them, in this order.
_CURVES = (("loss", "Loss"), ("accuracy", "Accuracy"), ("auc", "ROC AUC"))


def plot_history(history, path) -> Path:
    """Training vs validation curves (loss, accuracy and AUC where logged) per epoch.

    `history` is a keras History or its `.history` dict {metric: [value per epoch]}.
    """
    logs = getattr(history, "history", history) or {}
    panels = [(key, title) for key, title in _CURVES if key in logs or f"val_{key}" in logs]
    if not panels:
        raise ValueError(f"history has none of {[k for k, _ in _CURVES]}: keys {sorted(logs)}")
    fig = new_figure(width=4.2 * len(panels), height=3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    best = _best_epoch(logs)
    for ax, (key, title) in zip(axes, panels):
        if best is not None:  # early stopping restores this epoch's weights: the model exported
            ax.axvline(best, color="grey", ls=":", lw=1.2, label=f"best val AUC (epoch {best})")
        for prefix, label, style in (("", "train", "-o"), ("val_", "validation", "-s")):
            values = logs.get(prefix + key)
            if values:
                epochs = np.arange(1, len(values) + 1)
                ax.plot(epochs, values, style, label=label, markersize=4)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_confusion_matrix(confusion, path, title: str = "Confusion matrix",
                          class_names=CLASS_NAMES) -> Path:
    """Heatmap of [[tn, fp], [fn, tp]]: counts, with each row's share (recall per true class)."""
    import seaborn as sns

    cm = np.asarray(confusion, dtype=np.int64)
    row_share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    annotations = np.array([[f"{cm[i, j]}\n{row_share[i, j]:.1%}" for j in range(2)] for i in range(2)])
    fig = new_figure(width=4.6, height=3.9)
    ax = fig.subplots()
    # Colour by row share so the minority class's errors are as visible as the majority's.
    sns.heatmap(row_share, annot=annotations, fmt="", cmap="Blues", vmin=0, vmax=1, cbar=True,
                xticklabels=class_names, yticklabels=class_names, ax=ax, annot_kws={"size": 12},
                cbar_kws={"label": "share of true class"})
    ax.set(title=title, xlabel="predicted", ylabel="true")
    ax.tick_params(axis="y", labelrotation=0)
    return save_figure(fig, path)


def plot_roc(metrics: dict, path, title: str = "ROC") -> Path:
    """ROC curve from `metrics["roc"]` with the operating point at `metrics["threshold"]` marked."""
    roc = metrics["roc"]
    fpr, tpr = np.asarray(roc["fpr"], float), np.asarray(roc["tpr"], float)
    sens, spec = metrics["sensitivity"]["value"], metrics["specificity"]["value"]
    auc = metrics["roc_auc"]
    fig = new_figure(width=4.6, height=4.4)
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.plot([1 - spec], [sens], "o", color="crimson", markersize=9,
            label=f"threshold {metrics['threshold']:.3f}\nsens {sens:.2f}, spec {spec:.2f}")
    ax.set(title=title, xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_pr(metrics: dict, path, title: str = "Precision-recall") -> Path:
    """PR curve from `metrics["pr"]` (step-wise, as average precision integrates it), the
    prevalence as the chance level, and the operating point at `metrics["threshold"]` marked."""
    pr = metrics["pr"]
    recall, precision = np.asarray(pr["recall"], float), np.asarray(pr["precision"], float)
    auprc = metrics["auprc"]
    sens, prec = metrics["sensitivity"]["value"], metrics["precision"]["value"]
    fig = new_figure(width=4.6, height=4.4)
    ax = fig.subplots()
    ax.step(recall, precision, where="pre", lw=2,  # the precision of point k spans recall k-1..k
            label=f"AUPRC {auprc['value']:.3f} [{auprc['ci_low']:.3f}, {auprc['ci_high']:.3f}]")
    ax.axhline(metrics["prevalence"], ls="--", color="grey", lw=1,
               label=f"chance (prevalence {metrics['prevalence']:.2f})")
    ax.plot([sens], [prec], "o", color="crimson", markersize=9,
            label=f"threshold {metrics['threshold']:.3f}\nrecall {sens:.2f}, precision {prec:.2f}")
    ax.set(title=title, xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)


def plot_reliability(metrics: dict, path, title: str = "Reliability") -> Path:
    """Reliability diagram from `metrics["calibration"]`: observed PNEUMONIA share against mean
    P(PNEUMONIA) per bin (marker area ~ cases in the bin), the diagonal, and a count histogram."""
    cal = metrics["calibration"]
    count = np.asarray(cal["count"], float)
    filled = count > 0
    mean_p = np.asarray([np.nan if v is None else v for v in cal["mean_predicted"]], float)
    frac = np.asarray([np.nan if v is None else v for v in cal["fraction_positive"]], float)
    edges = np.asarray(cal["edges"], float)
    fig = new_figure(width=4.6, height=5.2)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    top.plot(mean_p[filled], frac[filled], "-o", lw=1.5, markersize=4,
             label=f"ECE {metrics['ece']:.3f}, Brier {metrics['brier']['value']:.3f}")
    top.scatter(mean_p[filled], frac[filled], s=20 + 200 * count[filled] / count.max(), alpha=0.3)
    top.set(title=title, ylabel="observed share of PNEUMONIA", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(edges[:-1], count, width=np.diff(edges), align="edge", color="tab:blue", alpha=0.6)
    bottom.set(xlabel="predicted P(PNEUMONIA)", ylabel="cases")
    bottom.grid(alpha=0.3)
    return save_figure(fig, path)


def _best_epoch(logs: dict) -> int | None:
    """1-based epoch of the best METRIC (the first on ties), or None if it was not logged."""
    values = logs.get(METRIC)
    if not values:
        return None
    return int(np.argmax(values) if MODE == "max" else np.argmin(values)) + 1


