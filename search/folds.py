"""Patient-grouped, class-stratified K folds of train + val, for `cxr search --cv K`.

    pool = load_pool("runs/prepared", k=5, seed=0)   # train + val pooled; test never read
    pool.fold_data(0)                                 # a cxr_model.Data: folds != 0 train, fold 0 validates
    write_folds(pool, "runs/sweep")                   # RUN/folds.csv: which patient is in which fold

The rule (`assign_folds`): one class per patient (the majority label of their images, ties to
PNEUMONIA, as for the val split of `cxr prepare`); per class, the patients are shuffled with a
generator seeded by (seed, class) and then dealt, largest first, each to the fold that holds the
fewest images of that class so far (ties: the lower fold). So every image of a patient is in one
fold, each fold holds about 1/K of each class's images, and the same seed gives the same folds.
Numpy and pandas only: the driver makes the folds and every trial receives them with the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_datasets.errors import CxrError
from cxr_datasets.storage import Location

FOLDS_FILE = "folds.csv"
# What a CV trial reports after each fold: how many folds it has completed (ASHA's time attribute
# in a CV sweep, and the score the kept checkpoint is chosen by).
FOLDS_DONE = "folds_done"
# ASHA's time attribute in a CV sweep: fold 1's epochs while it trains, then K * max_epochs after
# fold K (search/cv_trial.py), so the early rungs judge fold 1 epoch by epoch.
CV_BUDGET = "cv_budget"


def assign_folds(patient_ids, labels, k: int, seed: int) -> np.ndarray:
    """The fold (0 .. k-1) of every image; see the module docstring for the rule."""
    ids = np.asarray(patient_ids, dtype=object)
    labels = np.asarray(labels, dtype=np.int64)
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} patient ids for {len(labels)} labels")
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    patients, inverse = np.unique(ids, return_inverse=True)
    images = np.bincount(inverse, minlength=len(patients))
    share = np.bincount(inverse, weights=labels.astype(np.float64), minlength=len(patients)) / images
    patient_class = (share >= 0.5).astype(np.int64)
    patient_fold = np.full(len(patients), -1, dtype=np.int64)
    for label in (0, 1):
        members = np.flatnonzero(patient_class == label)
        if 0 < len(members) < k:
            raise CxrError(f"--cv {k} needs at least {k} patients of each class in train + val, but class "
                           f"{label} has {len(members)}: choose a smaller --cv")
        order = members[np.random.default_rng([seed, label]).permutation(len(members))]
        order = order[np.argsort(-images[order], kind="stable")]  # largest first, shuffled among equals
        load = np.zeros(k, dtype=np.int64)
        for patient in order:
            fold = int(np.argmin(load))
            patient_fold[patient] = fold
            load[fold] += images[patient]
    return patient_fold[inverse]


@dataclass
class CVPool:
    """Train + val pooled for cross-validation: images, labels, patient ids, the fold of each image.

    Read-only arrays (in a sweep, views onto Ray's object store). `class_weight` is not stored:
    each fold's `Data` computes the balanced weights of its own training part.
    """

    x: np.ndarray
    y: np.ndarray
    patient_id: np.ndarray
    fold: np.ndarray
    k: int
    seed: int = 0
    source: str | None = None

    @property
    def image_size(self) -> int:
        return int(self.x.shape[1])

    def held_out(self, fold: int) -> np.ndarray:
        """Row indices of fold `fold` (its validation part), ascending."""
        return np.flatnonzero(self.fold == fold)

    def fold_data(self, fold: int):
        """A `cxr_model.Data`: the other folds train, fold `fold` validates."""
        from cxr_model.data import Data

        val = self.fold == fold
        return Data(self.x[~val], self.y[~val], self.x[val], self.y[val], source=self.source)

    def table(self) -> pd.DataFrame:
        """One row per patient: patient_id, fold (1-based, as reported), images, pneumonia images."""
        frame = pd.DataFrame({"patient_id": self.patient_id, "fold": self.fold + 1, "label": self.y})
        grouped = frame.groupby("patient_id", sort=True)
        return pd.DataFrame({"fold": grouped["fold"].first(), "images": grouped.size(),
                             "pneumonia_images": grouped["label"].sum()}).reset_index()


def load_pool(prepared, k: int, seed: int) -> CVPool:
    """Train + val of a prepared folder (or URI) with their patient ids, dealt into k folds."""
    import cxr_datasets

    where = Location.of(prepared)
    parts = [cxr_datasets.load(where, split) for split in ("train", "val")]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    ids = np.concatenate([p[2]["patient_id"].to_numpy(dtype=object) for p in parts])
    return CVPool(x=x, y=y, patient_id=ids, fold=assign_folds(ids, y, k, seed), k=k, seed=seed,
                  source=where.local or where.uri)


def write_folds(pool: CVPool, run_dir) -> Path:
    """RUN/folds.csv: patient_id, fold (1..K), images, pneumonia_images."""
    path = Path(run_dir) / FOLDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    pool.table().to_csv(path, index=False)
    return path


def standard_error(values) -> float:
    """Standard error of the mean of `values` (NaN for fewer than two)."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    return float(values.std(ddof=1) / np.sqrt(len(values)))
