"""Duplicates, patient leakage and the train/val/test assignment, on metadata only (no pixels).

Rules (the manifest records what each one did):
- Exact duplicates (same sha256): one copy is kept; a copy in the official test split always wins
  and the test split is never changed, so a train copy of a test image is dropped from train.
- `official`: test is kept exactly; the official val (16 images in the Kaggle set) is folded into
  train; images of a patient who is also in test are dropped from train; then `val_fraction` of the
  train *patients* of each class is carved out as val (seeded).
- `random` (and any source without split folders): each class's patients are shuffled (seeded) and
  `test_fraction` / `val_fraction` of them go to test / val.
A patient therefore never appears in two splits.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import CLASS_NAMES, SPLITS
from .errors import CxrError


def drop_duplicates(table: pd.DataFrame, official: bool, key: str = "sha256",
                    key_text=str) -> tuple[pd.DataFrame, list[dict]]:
    """Rows of `table` (columns rel_path, official_split and `key`: equal keys, equal bytes) left
    after exact-duplicate removal, and one manifest entry per extra copy (its `sha256`:
    `key_text(key)`; prepare keys the rows by a number per content and writes its hex sha256)."""
    keep = pd.Series(True, index=table.index)
    report = []
    repeated = table[table.duplicated(key, keep=False)]
    for value, group in repeated.groupby(key, sort=True):
        sha = key_text(value)
        in_test = group["official_split"].eq("test") if official else pd.Series(False, group.index)
        ordered = group.assign(_test=in_test).sort_values(["_test", "rel_path"], ascending=[False, True])
        kept_path = ordered["rel_path"].iloc[0]
        for index, row in ordered.iloc[1:].iterrows():
            if row["_test"]:  # the test split is never changed: report, keep
                report.append(_duplicate(row, kept_path, sha, "kept (test split is never changed)"))
                continue
            keep[index] = False
            report.append(_duplicate(row, kept_path, sha, "removed"))
    # in sha256 order (a stable sort keeps each group's order), whatever the key's order
    return table[keep], sorted(report, key=lambda r: r["sha256"])


def drop_test_patients_from_train(table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Official layout: train/val images of patients that are also in test leak into the test score."""
    leaking = table["official_split"].ne("test") & table["patient_id"].isin(_official_test_patients(table))
    overlap = {
        "patients": int(table.loc[leaking, "patient_id"].nunique()),
        "images_removed_from_train": int(leaking.sum()),
        "paths": sorted(table.loc[leaking, "rel_path"]),
    }
    return table[~leaking], overlap


def assign_splits(
    table: pd.DataFrame, mode: str, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
    """The split ("train" / "val" / "test") of every row, grouped by patient, stratified by class."""
    patients = _patient_labels(table)
    if mode == "official":
        test_patients = _official_test_patients(table)
        pooled = patients.drop(index=test_patients, errors="ignore")
        chosen = _carve(pooled, {"val": val_fraction}, seed)
        chosen.update({p: "test" for p in test_patients})
    else:
        chosen = _carve(patients, {"test": test_fraction, "val": val_fraction}, seed)
    # An object column of three shared strings (pandas' default string type would copy each).
    return pd.Series([chosen.get(p, "train") for p in table["patient_id"]], index=table.index,
                     dtype=object, name="split")


def check_splits(table: pd.DataFrame, mode: str, source_has_test: bool) -> list[str]:
    """An empty or one-class train is an error (one clear line): nothing can be learnt from it. A
    val or test split that is empty or one-class (a small archive) is returned as a warning for
    the manifest: its metrics are meaningless, so the user is told, but the data still prepares."""
    if mode == "official" and not source_has_test:
        raise CxrError(
            "the source has split folders but no test/ folder with usable images; "
            "add one or use --split random to carve a test split out of the data"
        )
    warnings = []
    for split in SPLITS:
        present = set(table.loc[table["split"] == split, "label"])
        for label, name in enumerate(CLASS_NAMES):
            if label in present:
                continue
            if split == "train":
                raise CxrError(
                    f"no {name} images in the train split after preprocessing "
                    f"({_counts_line(table)}): train needs both classes; add images or "
                    f"change --val-fraction/--test-fraction"
                )
            warnings.append(f"no {name} images in the {split} split ({_counts_line(table)}): "
                            f"its metrics are not meaningful")
    return warnings


def split_counts(table: pd.DataFrame) -> dict:
    """{split: {class_name: n}} for the manifest."""
    return {
        split: {name: int(((table["split"] == split) & (table["label"] == i)).sum())
                for i, name in enumerate(CLASS_NAMES)}
        for split in SPLITS
    }


def patients_per_split(table: pd.DataFrame) -> dict:
    return {split: int(table.loc[table["split"] == split, "patient_id"].nunique()) for split in SPLITS}


def class_weights(counts: dict) -> dict:
    """Keras class_weight from train: n / (2 * n_class), so each class carries half the total loss."""
    train = counts["train"]
    total = sum(train.values())
    return {str(i): round(total / (len(CLASS_NAMES) * train[name]), 6)
            for i, name in enumerate(CLASS_NAMES)}


def _patient_labels(table: pd.DataFrame) -> pd.Series:
    """One class per patient for stratification: the majority label (ties go to PNEUMONIA),
    indexed by the sorted patient ids. Counted with numpy on an object index: pandas would group
    by Arrow-backed string keys, and leave megabytes behind in Arrow's allocator."""
    ids, inverse = np.unique(table["patient_id"].to_numpy(dtype=object), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(ids))
    share = np.bincount(inverse, weights=table["label"].to_numpy(np.float64), minlength=len(ids)) / counts
    return pd.Series((share >= 0.5).astype("int64"), index=pd.Index(ids, dtype=object))


def _official_test_patients(table: pd.DataFrame) -> list[str]:
    return sorted(set(table.loc[table["official_split"] == "test", "patient_id"]))


def _carve(patients: pd.Series, fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Per class: shuffle its patients (seeded by seed and class) and deal them out by fraction.

    Each split with a non-zero fraction gets at least one patient of a class that has enough patients for all splits, so a
    small data set still has both classes everywhere.
    """
    chosen: dict[str, str] = {}
    for label in sorted(patients.unique()):
        members = patients.index[patients == label].to_numpy()
        order = np.random.default_rng([seed, int(label)]).permutation(len(members))
        start = 0
        for split, fraction in fractions.items():
            take = round(fraction * len(members))
            if fraction > 0 and len(members) > len(fractions):
                take = max(take, 1)
            take = min(take, len(members) - start - 1)  # always leave train at least one patient
            for index in order[start:start + max(take, 0)]:
                chosen[members[index]] = split
            start += max(take, 0)
    return chosen


def _duplicate(row: pd.Series, kept_path: str, sha: str, action: str) -> dict:
    return {"path": row["rel_path"], "duplicate_of": kept_path, "sha256": sha, "action": action}


def _counts_line(table: pd.DataFrame) -> str:
    counts = split_counts(table)
    return "; ".join(f"{s}: " + ", ".join(f"{n} {c}" for c, n in counts[s].items()) for s in SPLITS)
