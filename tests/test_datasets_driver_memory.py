"""The driver's per-file metadata of `cxr prepare` (what keeps its memory flat as the data grows):
pass 1's results written in place by file index (sha256 digests as 32 raw bytes in one array),
object columns instead of Arrow-backed string copies, shard columns made per batch, and the
rewritten steps giving exactly what the pandas formulations they replaced gave.
No Ray. The memory figure itself is bench/prepare_memory.py's."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cxr_datasets.config import CLASS_NAMES, SPLITS
from cxr_datasets.decode import INPUT_SCHEMA, HashColumns, _input_batch
from cxr_datasets.discover import FilePaths
from cxr_datasets.eda import SAMPLES_PER_CLASS, sample_rows
from cxr_datasets.prepare_dataset import ROW_COLUMNS, _shard_rows
from cxr_datasets.splits import _patient_labels
from cxr_datasets.workers import HASH_SCHEMA


def _digest(i: int) -> bytes:
    return hashlib.sha256(str(i % 4).encode()).digest()  # files 0 and 4 have the same bytes


def _batch(idx, node="10.0.0.7") -> pa.Table:
    """What one pass-1 task returns for files `idx`: odd ones unreadable."""
    ok = [i % 2 == 0 for i in idx]
    return pa.table({
        "idx": pa.array(idx, pa.int64()),
        "reason": [None if good else f"bad {i}" for i, good in zip(idx, ok)],
        "sha256": pa.array([_digest(i) if good else None for i, good in zip(idx, ok)], pa.binary(32)),
        "node": [node] * len(idx),
    }, schema=HASH_SCHEMA)


def test_hash_columns_fill_by_file_index_in_any_batch_order():
    columns = HashColumns(6)
    assert columns.add(_batch([3, 4, 5]).slice(0)) == 3  # the later batch finishes first
    columns.add(pa.concat_tables([_batch([0]), _batch([1, 2])]))  # a batch of two chunks
    columns.check()
    table = columns.table()
    assert table["reason"].tolist() == [None, "bad 1", None, "bad 3", None, "bad 5"]
    assert set(table["node"]) == {"10.0.0.7"}
    assert [columns.hex(i) for i in (0, 2, 4)] == [_digest(i).hex() for i in (0, 2, 4)]
    # Equal bytes, equal content number: the first file with them.
    assert table["content"][[0, 2, 4]].tolist() == [0, 2, 0]
    # Object columns: filtering and sorting copy pointers, not each string's bytes.
    for name in ("reason", "node"):
        assert table[name].dtype == object, name
    assert table["content"].dtype == np.int64
    assert columns.digest.dtype == np.uint8 and columns.digest.shape == (6, 32)


@pytest.mark.parametrize("batches", [[[0, 1, 2]], [[0, 1, 2], [3, 4, 5], [2]]])
def test_hash_columns_refuse_a_lost_or_repeated_file(batches):
    columns = HashColumns(6)
    for idx in batches:
        columns.add(_batch(idx))
    with pytest.raises(RuntimeError, match="rows for 6 files"):
        columns.check()


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
        "node": obj(["10.0.0.7"] * n),
        "content": np.arange(n),
        "split": obj(rng.choice(list(SPLITS), n).tolist()),
    })


def test_shard_rows_sorted_by_split_then_path_and_their_input_batches():
    usable = _usable(300)
    rows = _shard_rows(usable)
    assert list(rows.columns) == ROW_COLUMNS
    expected = usable.assign(_rank=usable["split"].map(SPLITS.index)) \
        .sort_values(["_rank", "rel_path"])
    assert rows["source_path"].tolist() == expected["rel_path"].tolist()
    assert rows["file"].tolist() == expected.index.tolist()
    # Pass 2's input: the columns the driver keeps none of are made per batch, for the right file.
    hashes = HashColumns(len(usable))
    hashes.digest[:] = np.frombuffer(b"".join(hashlib.sha256(str(i).encode()).digest()
                                              for i in range(len(usable))), np.uint8).reshape(-1, 32)
    where = np.arange(10, 60)
    batch = _input_batch(rows, FilePaths("/src", usable["rel_path"].to_numpy()), hashes, where, 64)
    assert batch.schema == INPUT_SCHEMA
    picked = expected.iloc[where]
    assert batch.column("pos").to_pylist() == where.tolist()
    assert batch.column("path").to_pylist() == [f"/src/{p}" for p in picked["rel_path"]]
    assert batch.column("source_sha256").to_pylist() == [
        hashlib.sha256(str(i).encode()).hexdigest() for i in picked.index]
    assert batch.column("label_name").to_pylist() == [CLASS_NAMES[i] for i in picked["label"]]
    assert batch.column("patient_id").to_pylist() == picked["patient_id"].tolist()
    assert set(batch.column("height").to_pylist()) == set(batch.column("width").to_pylist()) == {64}


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
    rows = _shard_rows(_usable(400, seed=5))
    picked = sample_rows(rows, seed=7)
    # The formulation it replaced: copy the train rows, then each class's rows, then pick.
    pool = rows[rows["split"] == "train"]
    rng = np.random.default_rng(7)
    expected = pd.concat([
        part.iloc[rng.permutation(len(part))[:SAMPLES_PER_CLASS]]
        for part in (pool[pool["label"] == label] for label in range(len(CLASS_NAMES)))
    ])
    assert picked.index.tolist() == expected.index.tolist()
    assert len(picked) == 2 * SAMPLES_PER_CLASS


def test_size_scatter_draws_a_sample_of_a_large_class_and_says_so(monkeypatch):
    from cxr_datasets import eda

    monkeypatch.setattr(eda, "SIZE_POINTS_PER_CLASS", 10)
    n = 30
    table = pd.DataFrame({"label": [0] * 5 + [1] * (n - 5),
                          "orig_width": np.arange(n) + 100, "orig_height": np.arange(n) + 200})
    fig = eda._sizes(table)
    ax = fig.axes[0]
    drawn = [len(collection.get_offsets()) for collection in ax.collections]
    assert drawn == [5, 10]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[0] == f"{CLASS_NAMES[0]} (median 102 x 202)"
    # the median is the whole class's, not the sample's
    assert labels[1] == f"{CLASS_NAMES[1]} (median 117 x 217, 10 of 25 shown)"


def test_shards_are_cut_by_chunk_of_one_split_whatever_the_blocks(tmp_path):
    """Pass 2's shard k of a split is its rows k*R..k*R+R-1, less rejected files, however Ray
    Data hands the decoded rows to the sink: one chunk in two blocks is one shard; two chunks in
    one call are two. The rows of each shard come back from the file beside it."""
    from cxr_datasets.decode import shard_chunks, shard_size
    from cxr_datasets.raydata import ShardSink, read_row_meta
    from cxr_datasets.shards import PARQUET_SCHEMA
    from cxr_datasets.storage import Location

    # The default: 1024 rows, fewer below ~65,000 so that small archives make >= 64 shards, and
    # fewer for large images so that a shard's pixels stay under 64 MiB
    assert [shard_size(n, 224, None) for n in (120, 5_856, 20_000, 65_536, 200_000)] == \
        [128, 128, 313, 1024, 1024]
    assert [shard_size(200_000, s, None) for s in (64, 256, 512, 1024, 4096)] == \
        [1024, 1024, 256, 64, 16]
    assert shard_size(200_000, 224, 40) == 40
    split_of = np.array(["train"] * 5 + ["val"] * 3 + ["test"] * 2)
    chunks = shard_chunks(split_of, 2)
    assert [list(c) for c in chunks] == [[0, 1], [2, 3], [4], [5, 6], [7], [8, 9]]

    def rows(positions):
        n = len(positions)
        columns = {f.name: pa.nulls(n, f.type) for f in PARQUET_SCHEMA}
        columns.update(pos=pa.array(positions, pa.int64()), image=pa.array([b"\0" * 4] * n),
                       split=pa.array([str(split_of[p]) for p in positions]),
                       orig_width=pa.array([10 + p for p in positions], pa.int32()),
                       orig_height=pa.array([20] * n, pa.int32()), orig_mode=pa.array(["L"] * n),
                       height=pa.array([2] * n, pa.int32()), width=pa.array([2] * n, pa.int32()),
                       label=pa.array([0] * n, pa.int64()))
        return pa.table(columns)

    out = Location.of(tmp_path)
    out.child(".pending").mkdir()
    sink = ShardSink(out, ["parquet"], [], [int(c[0]) for c in chunks])
    # row 1 rejected; chunk [2, 3] arrives in two blocks; chunks [4] and [5, 6] in one call
    written = sink.write([rows([0])], None) + sink.write([rows([2]), rows([3])], None) + \
        sink.write([rows([4, 5, 6])], None)
    assert [(r["split"], r["first"], r["rows"]) for r in written] == \
        [("train", 0, 1), ("train", 2, 2), ("train", 4, 1), ("val", 5, 2)]
    meta = read_row_meta(out, written[1])
    assert meta.column("pos").to_pylist() == [2, 3]
    assert meta.column("orig_width").to_pylist() == [12, 13]
