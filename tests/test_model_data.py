"""Data and the input pipeline: every sample once per epoch, seeded reshuffles, weights, TFRecords."""
import numpy as np
import pandas as pd
import pytest

from cxr_model import BatchStream, Data, tfrecord_dataset
from cxr_model.data import balanced_class_weight, tfrecord_files


def _arrays(n=50, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, size, size, 1), np.uint8)
    return x, rng.integers(0, 2, n)  # image i is filled with value i: batches reveal their ids


def _ids(stream, epoch):
    return np.concatenate([xb[:, 0, 0, 0] for xb, _, _ in stream.epoch(epoch)]).astype(int)


def test_every_sample_once_per_epoch_and_reshuffled():
    x, y = _arrays()
    stream = BatchStream(x, y, batch_size=16, seed=0)
    first, second = _ids(stream, 0), _ids(stream, 1)
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert not np.array_equal(first, second)
    assert stream.steps_per_epoch == 4
    assert [len(xb) for xb, _, _ in stream.epoch(0)] == [16, 16, 16, 2]


def test_order_is_a_function_of_seed_and_epoch():
    x, y = _arrays()
    a, b = BatchStream(x, y, 16, seed=1), BatchStream(x, y, 16, seed=1)
    np.testing.assert_array_equal(_ids(a, 3), _ids(b, 3))
    assert not np.array_equal(_ids(a, 0), _ids(BatchStream(x, y, 16, seed=2), 0))
    assert list(_ids(BatchStream(x, y, 16, shuffle=False), 0)) == list(range(50))


def test_labels_one_hot_and_class_weights_follow_the_samples():
    x, y = _arrays()
    stream = BatchStream(x, y, 16, seed=0, class_weight={0: 0.25, 1: 4.0})
    for xb, yb, wb in stream.epoch(0):
        ids = xb[:, 0, 0, 0].astype(int)
        np.testing.assert_array_equal(yb.argmax(axis=1), y[ids])
        np.testing.assert_array_equal(wb, np.where(y[ids] == 1, 4.0, 0.25))
        assert yb.dtype == np.float32 and wb.dtype == np.float32


def test_background_iteration_runs_across_epochs_and_stops():
    x, y = _arrays()
    stream = BatchStream(x, y, 16, seed=0, prefetch=2)
    it = iter(stream)
    got = np.concatenate([next(it)[0][:, 0, 0, 0] for _ in range(8)]).astype(int)
    np.testing.assert_array_equal(got, np.concatenate([_ids(stream, 0), _ids(stream, 1)]))
    it.close()
    assert stream._stop.is_set()


def test_data_checks_shapes_and_defaults_class_weights():
    x, y = _arrays(40, 32)
    data = Data(x[..., 0], y, x[:10], y[:10])  # [N, S, S] gets its channel axis
    assert data.x_train.shape == (40, 32, 32, 1) and data.image_size == 32
    assert data.class_weight == pytest.approx(balanced_class_weight(y))
    with pytest.raises(ValueError, match="uint8"):
        Data(x.astype(np.float32), y, x, y)
    with pytest.raises(ValueError, match="labels"):
        Data(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="0 \\(NORMAL\\) or 1"):
        Data(x, y + 1, x, y)


def test_balanced_class_weight_formula():
    assert balanced_class_weight(np.array([0, 1, 1, 1])) == pytest.approx({0: 2.0, 1: 4 / 6})


def test_from_prepared_uses_the_manifest(prepared_small):
    import cxr_datasets

    data = Data.from_prepared(prepared_small)
    manifest = cxr_datasets.read_manifest(prepared_small)
    assert data.image_size == 32 and data.x_train.dtype == np.uint8
    assert len(data.y_train) == sum(manifest["counts"]["train"].values())
    assert data.class_weight == pytest.approx({int(k): v for k, v in manifest["class_weights"].items()})


def test_tfrecord_pipeline_reads_every_record_once(tmp_path):
    pytest.importorskip("tensorflow")
    from cxr_datasets.shards import write_tfrecord_shards

    x, y = _arrays(37, 32)
    rows = pd.DataFrame({
        "image": [img[..., 0].tobytes() for img in x], "height": 32, "width": 32, "label": y,
        "label_name": np.where(y == 1, "PNEUMONIA", "NORMAL"),
        "patient_id": [f"p{i}" for i in range(len(y))], "source_path": "x.png"})
    write_tfrecord_shards(rows, "train", tmp_path, rows_per_shard=10)
    files = tfrecord_files(tmp_path, "train")
    assert len(files) == 4
    ds = tfrecord_dataset(files, 32, batch_size=8, seed=0, class_weight={0: 1.0, 1: 3.0})
    seen = []
    for xb, yb, wb in ds.as_numpy_iterator():
        ids = xb[:, 0, 0, 0].astype(int)
        assert xb.dtype == np.uint8 and xb.shape[1:] == (32, 32, 1)
        np.testing.assert_array_equal(yb.argmax(axis=1), y[ids])
        np.testing.assert_array_equal(wb, np.where(y[ids] == 1, 3.0, 1.0))
        seen.extend(ids)
    assert sorted(seen) == list(range(37))
