"""`cxr search --cv K`'s folds: every patient in one fold, each class spread evenly, the same seed
the same folds, and the fold table recorded in the run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_search.folds import assign_folds, standard_error


def _patients(seed: int = 0, n_patients: int = 60):
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for p in range(n_patients):
        label = int(p % 3 != 0)  # a third NORMAL patients, like Kermany
        for _ in range(int(rng.integers(1, 6))):
            ids.append(f"p{p:03d}")
            labels.append(label)
    return np.array(ids, dtype=object), np.array(labels)


def test_folds_are_disjoint_by_patient_and_stratified():
    ids, labels = _patients()
    k = 5
    folds = assign_folds(ids, labels, k, seed=0)
    assert set(folds) == set(range(k))
    frame = pd.DataFrame({"patient": ids, "fold": folds, "label": labels})
    assert (frame.groupby("patient")["fold"].nunique() == 1).all()  # no patient in two folds
    for label in (0, 1):
        per_fold = frame[frame["label"] == label].groupby("fold").size()
        assert len(per_fold) == k
        assert per_fold.max() - per_fold.min() <= 5  # within one patient's images of each other


def test_the_same_seed_gives_the_same_folds_and_another_seed_others():
    ids, labels = _patients()
    a = assign_folds(ids, labels, 3, seed=7)
    np.testing.assert_array_equal(a, assign_folds(ids, labels, 3, seed=7))
    assert not np.array_equal(a, assign_folds(ids, labels, 3, seed=8))
    # the order of the rows does not matter, only who is who
    order = np.random.default_rng(1).permutation(len(ids))
    np.testing.assert_array_equal(assign_folds(ids[order], labels[order], 3, seed=7), a[order])


def test_too_few_patients_of_a_class_is_one_clear_error():
    from cxr_datasets.errors import CxrError

    ids = np.array(["a", "b", "c", "d"], dtype=object)
    with pytest.raises(CxrError, match="--cv 3 needs at least 3 patients"):
        assign_folds(ids, np.array([0, 0, 1, 1]), 3, seed=0)


def test_standard_error():
    assert standard_error([0.8, 0.9]) == pytest.approx(0.05)
    assert np.isnan(standard_error([0.8]))


def test_search_config_cv_values():
    from cxr_datasets.errors import ConfigError
    from cxr_search.config import SearchConfig

    assert SearchConfig(prepared="p", out="o").cv == 0
    assert SearchConfig(prepared="p", out="o", cv=5).cv == 5
    for bad in (1, -1, 2.5):
        with pytest.raises(ConfigError, match="cv"):
            SearchConfig(prepared="p", out="o", cv=bad)
    with pytest.raises(ConfigError, match="refit"):
        SearchConfig(prepared="p", out="o", refit=True)


def test_pool_of_a_prepared_folder_and_its_fold_table(prepared_small, tmp_path):
    import cxr_datasets
    from cxr_search.folds import load_pool, write_folds

    pool = load_pool(prepared_small, k=3, seed=0)
    n = sum(len(cxr_datasets.load(prepared_small, s)[1]) for s in ("train", "val"))
    assert len(pool.y) == len(pool.x) == n
    data = pool.fold_data(1)
    assert len(data.y_val) == (pool.fold == 1).sum() and len(data.y_train) == n - len(data.y_val)
    table = pd.read_csv(write_folds(pool, tmp_path))
    assert table["patient_id"].is_unique and set(table["fold"]) == {1, 2, 3}
    assert table["images"].sum() == n
