"""Inside a trial: report each epoch to Tune and checkpoint the trial's best weights.

Imported only in trial processes (it imports Keras). Ray ships a
`ray.tune.integration.keras.TuneReportCheckpointCallback`, but it reports the last epoch's value,
checkpoints through TensorFlow (absent on the JAX GPU machines) and keeps no best-so-far; this
callback does the three things a sweep needs and nothing else.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import ray
from ray import tune

from cxr_model.config import improves
from cxr_model.train import CheckpointCallback
from cxr_search.checkpoint import OPTIMIZER_FILE, STATE_FILE, WEIGHTS_FILE, ResumeState, load_weights, save_weights
from cxr_search.space import EPOCH_METRIC, METRIC

__all__ = ["ReportCallback", "ResumeState"]  # ResumeState: where trainable.py has always found it


def save_optimizer(optimizer, path: Path) -> None:
    np.savez(path, *[keras.ops.convert_to_numpy(v.value) for v in optimizer.variables])


def load_optimizer(optimizer, variables, path: Path | str) -> None:
    """Restore the optimizer's variables (built first for `variables`: Keras builds it lazily)."""
    if not optimizer.built:
        optimizer.build(variables)
    with np.load(path) as stored:
        values = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    targets = optimizer.variables
    if [tuple(v.shape) for v in targets] != [tuple(v.shape) for v in values]:
        raise ValueError(f"the checkpoint's optimizer state ({len(values)} variables) does not fit this "
                         f"model's optimizer ({len(targets)} variables)")
    for target, value in zip(targets, values):
        target.assign(value)


class ReportCallback(CheckpointCallback):
    """After every epoch: `tune.report` the metrics; when validation AUC improved, with a checkpoint
    of the full model's weights and of the optimizer that steps (`self.trained_model`, set by fit).

    The optimised value (METRIC, `val_auc`) is the BEST validation AUC so far in the trial, not the last
    epoch's. ASHA stops trials at different budgets, and Ray's OptunaSearch tells Optuna the last
    reported value of a stopped trial as a COMPLETE result, so TPE compares a trial stopped after 2
    epochs with one that ran 20. Best-so-far is what the trial would deliver if we kept its best
    epoch (we do: its checkpoint), it never falls when a trial overfits, and at any fixed budget
    ASHA's rung comparisons rank trials the same way. The raw value is reported as EPOCH_METRIC.

    Only improving epochs are checkpointed, so with `num_to_keep=1` Tune holds exactly one
    checkpoint per trial: its best one, which is both what a retried trial resumes from and what
    the best trial's model is rebuilt from.
    """

    def __init__(self, *, resume: ResumeState, train_cfg, feature_cache: bool):
        super().__init__()
        self.resume = resume
        self.train_cfg = train_cfg
        self.feature_cache = feature_cache
        self.best_value = resume.best_value
        self.best_epoch = resume.best_epoch
        self.history = {k: list(v) for k, v in resume.history.items()}
        self._epoch_start = time.perf_counter()

    def on_train_begin(self, logs=None):
        if self.resume.weights_path:
            # `self.model` is always the full model (cxr_model.fit shows callbacks the full model
            # also while it trains the head on cached features), so the checkpoint's weights fit.
            load_weights(self.model, self.resume.weights_path)
        if self.resume.optimizer_path:
            # The optimizer too (step count, Adam's moments): a retried trial continues the run it
            # would have had, instead of restarting Adam's bias correction and moment estimates.
            trained = self.trained_model
            load_optimizer(trained.optimizer, trained.trainable_variables, self.resume.optimizer_path)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        epoch_number = self.resume.epochs_done + epoch + 1  # 1-based, counting earlier attempts
        value = logs.get(METRIC, float("nan"))
        improved = improves(value, self.best_value)  # NaN never improves
        if improved:
            self.best_value, self.best_epoch = value, epoch_number
        for key, v in logs.items():
            self.history.setdefault(key, []).append(v)
        metrics = self._metrics(logs, epoch_number)
        if not improved:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="cxr-ckpt-") as folder:
            self._write_checkpoint(Path(folder), epoch_number)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    def _metrics(self, logs: dict[str, float], epoch_number: int) -> dict[str, Any]:
        # The first four keys are the columns of Tune's live status table.
        metrics = {
            METRIC: self.best_value if self.best_epoch else float("nan"),
            EPOCH_METRIC: logs.get(METRIC, float("nan")),
            "epoch": epoch_number,
            "val_loss": logs.get("val_loss", float("nan")),
        }
        metrics.update({k: v for k, v in logs.items() if k not in (METRIC, "val_loss")})
        metrics.update({
            "best_epoch": self.best_epoch,
            "epochs_since_best": epoch_number - self.best_epoch,
            "resumed_from_epoch": self.resume.epochs_done,
            "feature_cache": self.feature_cache,
            "optimizer_steps": int(keras.ops.convert_to_numpy(self.trained_model.optimizer.iterations)),
            "epoch_time_s": time.perf_counter() - self._epoch_start,
            # Two raylets on one machine share an IP; the node id tells them apart.
            "node_id": ray.get_runtime_context().get_node_id(),
        })
        return metrics

    def _write_checkpoint(self, folder: Path, epoch_number: int) -> None:
        save_weights(self.model, folder / WEIGHTS_FILE)
        save_optimizer(self.trained_model.optimizer, folder / OPTIMIZER_FILE)
        state = {
            "epoch": epoch_number,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "feature_cache": self.feature_cache,
            "train_config": self.train_cfg.to_dict(),
        }
        (folder / STATE_FILE).write_text(json.dumps(state))
