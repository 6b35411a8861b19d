"""Inside a trial of `cxr search --cv K`: one configuration, K fits, one Tune report per fold.

The path of one CV trial (search/trainable.py's `train_trial` hands over after its set-up):
1. The trial's last checkpoint, if it is a retry, says which folds are done (`CVResumeState`).
2. For each remaining fold f: `cxr_model.fit` trains the configuration on the other folds and
   validates on fold f (up to max_epochs, fit's own patience), on cached frozen features when the
   base is fixed: the cache answers every fold from fold 1's two arrays (cxr_model/features.py).
   `FoldRecorder` keeps the fold's best epoch's weights; the held-out fold's probabilities at
   those weights are its out-of-fold predictions.
3. During fold 1, after every epoch: `tune.report` of fold 1's best validation AUC so far, with
   `cv_budget` = the epoch (ASHA's time attribute), so ASHA's early rungs judge fold 1's epochs
   exactly as they judge a single-split trial's, before folds 2..K run: a configuration stopped
   there costs what it would cost without --cv.
4. After each fold f: `tune.report` with METRIC = the mean of the completed folds' best validation
   AUCs, `folds_done` = f, `cv_budget` = f * max_epochs (a completed fold counts as its whole
   budget, whether or not patience ended it sooner, so the budget only grows), and a checkpoint
   holding every completed fold: `fold_<f>/weights.npz` and, in state.json, each fold's best value
   and epoch, history and out-of-fold predictions.

Tune keeps the latest checkpoint (the one with most folds). A trial whose worker dies resumes
after its last completed fold; the fold it was training starts again from its first epoch.
Imported only in trial processes (it imports Keras), like search/trial_reporter.py.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import ray
from ray import tune

from cxr_model.config import WORST, improves
from cxr_search.checkpoint import STATE_FILE, WEIGHTS_FILE, fold_dir, save_weights
from cxr_search.folds import CV_BUDGET, FOLDS_DONE, standard_error
from cxr_search.space import METRIC, to_train_config


@dataclass
class CVResumeState:
    """What a retried CV trial carries over: the completed folds, their files in `folder`."""

    folds: list[dict] = field(default_factory=list)
    folder: Path | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint) -> "CVResumeState":
        if checkpoint is None:
            return cls()
        folder = Path(checkpoint.to_directory())
        state = json.loads((folder / STATE_FILE).read_text())
        return cls(folds=list(state["folds"]), folder=folder)


class FoldRecorder(keras.callbacks.Callback):
    """Per epoch: the logs; at every improving epoch: a copy of the full model's weights. With
    `report`, also a report to Tune after every epoch (fold 1: what ASHA's early rungs judge)."""

    def __init__(self, report=None):
        super().__init__()
        self.report = report
        self.history: dict[str, list[float]] = {}
        self.best_value, self.best_epoch, self.best_weights = WORST, 0, None
        self.epochs = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = {k: float(v) for k, v in (logs or {}).items()}
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        self.epochs = epoch + 1
        value = logs.get(METRIC, float("nan"))
        if improves(value, self.best_value):
            self.best_value, self.best_epoch = value, epoch + 1
            self.best_weights = self.model.get_weights()
        if self.report is not None:
            self.report(self)


def train_cv_trial(config: dict[str, Any], pool, settings: dict[str, Any], cache) -> None:
    """Train `config` on every fold of `pool` (a `cxr_search.folds.CVPool`) not yet done."""
    from cxr_model import fit
    from cxr_model.model import predict_proba
    from cxr_model.train import uses_feature_cache

    resume = CVResumeState.from_checkpoint(tune.get_checkpoint())
    train_cfg = to_train_config(config, image_size=settings["image_size"], weights=settings["weights"],
                                epochs=settings["max_epochs"], seed=settings["seed"],
                                patience=settings["patience"], use_feature_cache=settings["use_feature_cache"])
    on_features = uses_feature_cache(train_cfg)
    folds = list(resume.folds)
    with tempfile.TemporaryDirectory(prefix="cxr-cv-ckpt-") as tmp:
        folder = Path(tmp)
        for done in folds:  # the completed folds' weights go into every later checkpoint
            shutil.copytree(resume.folder / fold_dir(done["fold"]), folder / fold_dir(done["fold"]))
        for f in range(len(folds), pool.k):
            start = time.perf_counter()
            data = pool.fold_data(f)
            recorder = FoldRecorder(report=_epoch_reporter(on_features) if f == 0 else None)
            history = fit(train_cfg, data, callbacks=[recorder], feature_cache=cache if on_features else None)
            model = history.model
            if recorder.best_weights is not None:
                model.set_weights(recorder.best_weights)
            if on_features:  # the head on the held-out fold's cached features: no pass through VGG16
                features = cache.features(train_cfg.model, data.x_val, seed=train_cfg.seed)
                probs = np.asarray(model.get_layer("head").predict(features, verbose=0)[:, 1], np.float64)
            else:
                probs = predict_proba(model, data.x_val)
            (folder / fold_dir(f + 1)).mkdir()
            save_weights(model, folder / fold_dir(f + 1) / WEIGHTS_FILE)
            folds.append({
                "fold": f + 1, "best_value": recorder.best_value if recorder.best_epoch else None,
                "best_epoch": recorder.best_epoch, "epochs_run": recorder.epochs, "history": recorder.history,
                "held_out": pool.held_out(f).tolist(), "oof_probs": probs.tolist(),
                "duration_s": time.perf_counter() - start,
            })
            (folder / STATE_FILE).write_text(json.dumps({
                "cv": pool.k, "folds": folds, "feature_cache": on_features, "train_config": train_cfg.to_dict(),
            }))
            tune.report(_metrics(folds, resume, on_features, settings["max_epochs"]),
                        checkpoint=tune.Checkpoint.from_directory(folder))


def _epoch_reporter(on_features: bool):
    """Fold 1's per-epoch report (no checkpoint: a retry starts fold 1 again)."""
    def report(recorder: FoldRecorder) -> None:
        best = recorder.best_value if recorder.best_epoch else float("nan")
        tune.report({METRIC: best, "cv_se": float("nan"), FOLDS_DONE: 0, CV_BUDGET: recorder.epochs,
                     "fold_val_auc": best, "fold_best_epoch": recorder.best_epoch, "fold_epochs": recorder.epochs,
                     f"epoch_{METRIC}": recorder.history.get(METRIC, [float("nan")])[-1],
                     "epoch": recorder.epochs, "resumed_from_fold": 0, "feature_cache": on_features,
                     "node_id": ray.get_runtime_context().get_node_id()})
    return report


def _metrics(folds: list[dict], resume: CVResumeState, on_features: bool, max_epochs: int) -> dict[str, Any]:
    values = [f["best_value"] for f in folds if f["best_value"] is not None]
    last = folds[-1]
    return {
        METRIC: float(np.mean(values)) if values else float("nan"),
        "cv_se": standard_error(values),
        FOLDS_DONE: len(folds),
        CV_BUDGET: len(folds) * max_epochs,
        "fold_val_auc": last["best_value"] if last["best_value"] is not None else float("nan"),
        "fold_best_epoch": last["best_epoch"],
        "fold_epochs": last["epochs_run"],
        "epoch": sum(f["epochs_run"] for f in folds),  # epochs trained so far, over all folds
        "resumed_from_fold": len(resume.folds),
        "feature_cache": on_features,
        "node_id": ray.get_runtime_context().get_node_id(),
    }
