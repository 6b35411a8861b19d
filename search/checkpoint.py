"""A trial's checkpoint on disk: the model's weights and the trial's state, and what a retried
trial resumes from. Light (numpy and json): the driver reads checkpoints (search/best.py) without
importing Keras; search/trial_reporter.py writes them inside trials.

    RUN/tune/trial_<id>/checkpoint_*/weights.npz   the trainable weights of model.get_weights(),
                                                   by position, and the sha256 of the rest
    RUN/tune/trial_<id>/checkpoint_*/optimizer.npz the optimizer's variables (step, Adam's moments),
                                                   deleted when the trial ends (search/tuner.py)
    RUN/tune/trial_<id>/checkpoint_*/state.json    epoch, best value and epoch, per-epoch history,
                                                   feature_cache, the trial's TrainConfig
With `--cv K` (search/cv_trial.py) one checkpoint holds every fold the trial has completed:
    RUN/tune/trial_<id>/checkpoint_*/fold_<f>/weights.npz   fold f's model at its best epoch
    RUN/tune/trial_<id>/checkpoint_*/state.json             per fold: best value and epoch, epochs
                                                            run, history, held-out rows and their
                                                            out-of-fold probabilities
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_datasets.errors import CxrError
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
    """The weights training changes (the trainable ones: the head, fine-tuned VGG16 blocks), by
    their position in `model.get_weights()`, and the sha256 of all the others. The frozen VGG16
    base is ~59 MB of a trial's ~60 MB of weights at any image size, the same in every trial of a
    sweep (200 trials: 13 GB of copies); `load_weights` takes it from the model it loads into,
    which `build_model` makes from the trial's config and seed, and checks it against the hash."""
    values = model.get_weights()
    trained = {i for i, variable in enumerate(model.weights) if variable.trainable}
    np.savez(path, **{f"arr_{i}": values[i] for i in sorted(trained)}, count=np.int64(len(values)),
             frozen_sha256=np.array(_frozen_digest(values, trained)))


def load_weights(model, path: Path | str) -> None:
    """Set the checkpoint's weights on `model`, a model built from the trial's config and seed: the
    stored ones by position, the others kept from `model` if their sha256 is the checkpoint's
    (a CxrError if not: the base is not the one the trial trained on). A checkpoint written before
    2026-12-04 holds every weight."""
    with np.load(path) as stored:
        if "count" not in stored.files:  # every weight, in order
            model.set_weights([stored[f"arr_{i}"] for i in range(len(stored.files))])
            return
        values = model.get_weights()
        if len(values) != int(stored["count"]):
            raise CxrError(f"checkpoint {path} holds weights for {int(stored['count'])} variables, "
                           f"the model has {len(values)}: not the architecture it was trained with")
        trained = {i for i in range(len(values)) if f"arr_{i}" in stored.files}
        if _frozen_digest(values, trained) != str(stored["frozen_sha256"]):
            raise CxrError(f"checkpoint {path}: the frozen weights of the model built to load it are "
                           "not the ones the trial trained with (a changed --weights file, or "
                           "another Keras version's initialiser?)")
        for i in trained:
            values[i] = stored[f"arr_{i}"]
    model.set_weights(values)


def _frozen_digest(values: list, trained: set[int]) -> str:
    """sha256 of the weights at the positions not in `trained`, in order."""
    digest = hashlib.sha256()
    for i, value in enumerate(values):
        if i not in trained:
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()
