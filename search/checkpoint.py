"""A trial's checkpoint on disk: the model's weights and the trial's state, and what a retried
trial resumes from. Light (numpy and json): the driver reads checkpoints (search/best.py) without
importing Keras; search/trial_reporter.py writes them inside trials.

    RUN/tune/trial_<id>/checkpoint_*/weights.npz   model.get_weights(), in order
    RUN/tune/trial_<id>/checkpoint_*/optimizer.npz the optimizer's variables (step, Adam's moments)
    RUN/tune/trial_<id>/checkpoint_*/state.json    epoch, best value and epoch, per-epoch history,
                                                   feature_cache, the trial's TrainConfig
With `--cv K` (search/cv_trial.py) one checkpoint holds every fold the trial has completed:
    RUN/tune/trial_<id>/checkpoint_*/fold_<f>/weights.npz   fold f's model at its best epoch
    RUN/tune/trial_<id>/checkpoint_*/state.json             per fold: best value and epoch, epochs
                                                            run, history, held-out rows and their
                                                            out-of-fold probabilities
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_model.config import WORST

# Weights as a plain .npz of model.get_weights(): no h5py needed (the JAX GPU machines lack it),
# and the same architecture lists its weights in the same order in any process and backend.
WEIGHTS_FILE = "weights.npz"
OPTIMIZER_FILE = "optimizer.npz"  # the optimizer's variables: step count, Adam's moments
STATE_FILE = "state.json"


def fold_dir(fold: int) -> str:
    """A CV checkpoint's sub-folder of fold `fold` (1-based)."""
    return f"fold_{fold}"


@dataclass
class ResumeState:
    """What a retried trial carries over from its last checkpoint (nothing for a fresh trial)."""

    epochs_done: int = 0
    best_value: float = WORST
    best_epoch: int = 0
    history: dict[str, list] = field(default_factory=dict)  # per-epoch logs of earlier attempts
    weights_path: str | None = None
    optimizer_path: str | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint) -> "ResumeState":
        if checkpoint is None:
            return cls()
        folder = Path(checkpoint.to_directory())  # a local copy, also when storage is s3://
        state = json.loads((folder / STATE_FILE).read_text())
        optimizer = folder / OPTIMIZER_FILE
        return cls(epochs_done=state["epoch"], best_value=state["best_value"], best_epoch=state["best_epoch"],
                   history=state["history"], weights_path=str(folder / WEIGHTS_FILE),
                   optimizer_path=str(optimizer) if optimizer.is_file() else None)


def save_weights(model, path: Path) -> None:
    np.savez(path, *model.get_weights())


def load_weights(model, path: Path | str) -> None:
    with np.load(path) as stored:
        model.set_weights([stored[f"arr_{i}"] for i in range(len(stored.files))])
