"""The evaluation plots are written as readable PNGs (they were also looked at by eye)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from cxr_model import plots
from cxr_model.evaluate import metrics_from_probs


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_history_confusion_and_roc_plots_are_written(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(rng.random(200) * 0.6 + 0.35 * labels, 0, 1)
    metrics = metrics_from_probs(labels, probs, threshold=0.45, n_boot=100)
    history = {"loss": [0.7, 0.5, 0.4], "val_loss": [0.65, 0.55, 0.5],
               "accuracy": [0.6, 0.75, 0.8], "val_accuracy": [0.62, 0.7, 0.74]}

    curves = plots.plot_history(history, tmp_path / "plots" / "curves.png")
    confusion = plots.plot_confusion_matrix(metrics["confusion_matrix"], tmp_path / "cm.png")
    roc = plots.plot_roc(metrics, tmp_path / "roc.png")

    width, height = _png_size(curves)
    assert width > 1.5 * height  # loss and accuracy side by side (no AUC logged here)
    for path in (confusion, roc):
        width, height = _png_size(path)
        assert 300 < width < 1000 and 300 < height < 1000


def test_history_plot_accepts_a_keras_history_object(tmp_path):
    class History:  # what keras.callbacks.History exposes
        history = {"loss": [1.0, 0.5], "auc": [0.6, 0.7], "val_auc": [0.55, 0.65]}

    width, height = _png_size(plots.plot_history(History(), tmp_path / "h.png"))
    assert width > 1.5 * height  # loss and AUC panels


def test_pr_and_reliability_plots_are_written(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(rng.random(200) * 0.6 + 0.35 * labels, 0, 1)
    metrics = metrics_from_probs(labels, probs, threshold=0.45, n_boot=100)
    for path in (plots.plot_pr(metrics, tmp_path / "pr.png"), plots.plot_reliability(metrics, tmp_path / "rel.png")):
        width, height = _png_size(path)
        assert 300 < width < 1000 and 300 < height < 1000
