"""The driver's per-file metadata of `cxr prepare` (what keeps its memory flat as the data grows):
decode results written in place by file index, object columns instead of Arrow-backed string
copies, and the rewritten steps giving exactly what the pandas formulations they replaced gave.
No Ray. The memory figure itself is bench/prepare_memory.py's."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_datasets.config import CLASS_NAMES, SPLITS
from cxr_datasets.decode import DecodedColumns
from cxr_datasets.eda import SAMPLES_PER_CLASS, sample_rows
from cxr_datasets.prepare_dataset import ROW_COLUMNS, _shard_rows
from cxr_datasets.splits import _patient_labels


def _meta(idx, node="10.0.0.7"):
    """What one decode task returns for files `idx`: odd ones rejected."""
    ok = [i % 2 == 0 for i in idx]
    return {
        "idx": list(idx),
        "reason": [None if good else f"bad {i}" for i, good in zip(idx, ok)],
        "sha256": [f"{i:064x}" for i in idx],
        "orig_width": [100 + i if good else -1 for i, good in zip(idx, ok)],
        "orig_height": [200 + i if good else -1 for i, good in zip(idx, ok)],
        "orig_mode": ["L" if good else None for good in ok],
        "pos": [n if good else -1 for n, good in enumerate(ok)],
        "node": node,
    }


def test_decoded_columns_fill_by_file_index_in_any_chunk_order():
    columns = DecodedColumns(6)
    assert columns.add(_meta([3, 4, 5]), chunk=1) == 3  # the later chunk finishes first
    columns.add(_meta([0, 1, 2]), chunk=0)
    table = columns.table()
    assert table["sha256"].tolist() == [f"{i:064x}" for i in range(6)]
    assert table["reason"].tolist() == [None, "bad 1", None, "bad 3", None, "bad 5"]
    assert table["chunk"].tolist() == [0, 0, 0, 1, 1, 1]
    assert table["pos"].tolist() == [0, -1, 2, -1, 1, -1]
    assert table["orig_width"].tolist() == [100, -1, 102, -1, 104, -1]
    assert set(table["node"]) == {"10.0.0.7"}
    # Object columns: filtering and sorting copy pointers, not each string's bytes.
    for name in ("reason", "sha256", "orig_mode", "node"):
        assert table[name].dtype == object, name
    for name in ("orig_width", "orig_height", "pos", "chunk"):
        assert table[name].dtype == np.int64, name


@pytest.mark.parametrize("chunks", [[[0, 1, 2]], [[0, 1, 2], [3, 4, 5], [2]]])
def test_decoded_columns_refuse_a_lost_or_repeated_file(chunks):
    columns = DecodedColumns(6)
    for number, idx in enumerate(chunks):
        columns.add(_meta(idx), chunk=number)
    with pytest.raises(RuntimeError, match="rows for 6 files"):
        columns.table()


def _usable(n: int, seed: int = 0) -> pd.DataFrame:
    """Accepted rows as `_select` hands them to `_shard_rows`, in discovery order."""
    rng = np.random.default_rng(seed)
    obj = lambda values: pd.Series(values, dtype=object)  # noqa: E731
    patients = [f"person{p}_bacteria" for p in rng.integers(0, n // 3, n)]
    return pd.DataFrame({
        "rel_path": obj([f"train/{CLASS_NAMES[i % 2]}/f{rng.integers(1e9)}_{i}.jpeg"
                         for i in range(n)]),
        "label": rng.integers(0, 2, n),
        "official_split": obj(["train"] * n),
        "patient_id": obj(patients),
        "patient_from_name": np.ones(n, bool),
        "reason": obj([None] * n),
        "sha256": obj([f"{i:064x}" for i in range(n)]),
        "orig_width": rng.integers(500, 3000, n),
        "orig_height": rng.integers(500, 3000, n),
        "orig_mode": obj(rng.choice(["L", "RGB"], n).tolist()),
        "node": obj(["10.0.0.7"] * n),
        "pos": np.arange(n),
        "chunk": np.arange(n) // 7,
        "split": obj(rng.choice(list(SPLITS), n).tolist()),
    })


def test_shard_rows_sorted_by_split_then_path_with_shard_columns():
    usable = _usable(300)
    rows = _shard_rows(usable, 64)
    assert list(rows.columns) == ROW_COLUMNS
    expected = usable.assign(_rank=usable["split"].map(SPLITS.index)) \
        .sort_values(["_rank", "rel_path"]).reset_index(drop=True)
    assert rows["source_path"].tolist() == expected["rel_path"].tolist()
    assert rows["source_sha256"].tolist() == expected["sha256"].tolist()
    assert rows["label_name"].tolist() == [CLASS_NAMES[i] for i in expected["label"]]
    assert (rows[["height", "width"]] == 64).all().all()
    assert rows["chunk"].tolist() == expected["chunk"].tolist()


def test_patient_labels_majority_with_ties_to_pneumonia():
    usable = _usable(500, seed=3)
    usable.loc[usable.index[:4], "patient_id"] = "tie"  # two NORMAL, two PNEUMONIA
    usable.loc[usable.index[:4], "label"] = [0, 1, 0, 1]
    labels = _patient_labels(usable)
    # The pandas formulation it replaced.
    expected = usable.groupby("patient_id")["label"].agg(lambda s: int(s.mean() >= 0.5)).sort_index()
    assert labels.index.tolist() == expected.index.tolist()
    assert labels.tolist() == expected.tolist()
    assert labels["tie"] == 1


def test_sample_rows_pick_the_same_rows_as_filtering_copies():
    rows = _shard_rows(_usable(400, seed=5), 64)
    picked = sample_rows(rows, seed=7)
    # The formulation it replaced: copy the train rows, then each class's rows, then pick.
    pool = rows[rows["split"] == "train"]
    rng = np.random.default_rng(7)
    expected = pd.concat([
        part.iloc[rng.permutation(len(part))[:SAMPLES_PER_CLASS]]
        for part in (pool[pool["label_name"] == name] for name in CLASS_NAMES)
    ])
    assert picked.index.tolist() == expected.index.tolist()
    assert len(picked) == 2 * SAMPLES_PER_CLASS
