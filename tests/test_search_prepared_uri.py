"""`cxr train`, `cxr evaluate` and `cxr search` on a prepared data set given as a URI
(`s3://bucket/prepared` for a user; `file://` here, there is no network): the same code path as
s3:// or gs:// (pyarrow.fs). TFRecord shards are listed at a URI too. A whole sweep on a URI,
killed and resumed from its storage alone, with a resume on other data refused, is
test_search_resume.py's mid-trial test."""
from __future__ import annotations

import json

import pytest

import cxr_datasets
from cxr_datasets import CxrError
from cxr_search.main import main

TRAIN = ["--weights", "none", "--head-units", "8", "--aug-strength", "0", "--batch-size", "16", "--n-boot", "50"]


@pytest.mark.slow  # make test-slow: make test's sweep on a file:// URI is test_search_resume's mid-trial test
def test_train_and_evaluate_read_a_file_uri(prepared_small, tmp_path, capsys):
    from cxr_model import Data

    uri = prepared_small.as_uri()
    data = Data.from_prepared(uri)
    assert data.source == uri and data.x_train.tobytes() == Data.from_prepared(prepared_small).x_train.tobytes()

    out = tmp_path / "model"
    assert main(["train", uri, "--out", str(out), "--epochs", "1", "--quiet", *TRAIN]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["data"]["manifest_hash"] == cxr_datasets.manifest_hash(prepared_small)
    assert card["metrics"]["test"]["n"] == len(cxr_datasets.load(prepared_small, "test")[1])
    capsys.readouterr()
    assert main(["evaluate", str(out), uri, "--split", "test", "--n-boot", "50", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["test"]["n"] == card["metrics"]["test"]["n"]
    assert "not the prepared data" not in captured.err  # the URI's manifest hash is the folder's

    assert main(["train", f"{uri}-missing", "--out", str(tmp_path / "m2"), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert f"not a prepared folder (no manifest.json): {uri}-missing" in err and err.count("\n") == 1


def test_search_refuses_a_uri_that_is_not_a_prepared_folder(tmp_path, capsys):
    assert main(["search", (tmp_path / "nothing").as_uri(), "--out", str(tmp_path / "run")]) == 2
    assert "is not a prepared data set (no manifest.json)" in capsys.readouterr().err
    assert main(["search", "nosuch://bucket/prepared", "--out", str(tmp_path / "run")]) == 2
    assert "cannot open nosuch://bucket/prepared" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_tfrecord_shards_are_listed_and_streamed_through_a_file_uri(tmp_path):
    """`Data.from_prepared(..., stream_tfrecords=True)`'s shard list: file:// URIs that tf.data
    reads itself, the same records as the plain paths."""
    import keras
    import numpy as np
    import pandas as pd

    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.data path is TensorFlow-only")
    from cxr_datasets.shards import write_tfrecord_shards
    from cxr_model.data import tfrecord_dataset, tfrecord_files

    size, n = 8, 30
    images = np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)
    rows = pd.DataFrame({"image": [i.tobytes() for i in images], "height": size, "width": size,
                         "label": np.arange(n) % 2, "label_name": "x", "patient_id": "p", "source_path": "x"})
    write_tfrecord_shards(rows, "train", tmp_path, rows_per_shard=12)
    (tmp_path / "train" / "notes.txt").write_text("not a shard")
    local, uris = tfrecord_files(tmp_path, "train"), tfrecord_files(tmp_path.as_uri(), "train")
    assert [p.rsplit("/", 1)[1] for p in local] == ["part-00000.tfrecord", "part-00001.tfrecord",
                                                    "part-00002.tfrecord"]
    assert uris == [f"{tmp_path.as_uri()}/train/{p.rsplit('/', 1)[1]}" for p in local]

    def batches(files):
        ds = tfrecord_dataset(files, size, batch_size=n, shuffle=False)
        return [(x.numpy(), y.numpy()) for x, y, _w in ds]

    (x_uri, y_uri), = batches(uris)
    (x_local, y_local), = batches(local)
    assert x_uri.tobytes() == x_local.tobytes() and (y_uri == y_local).all()
    # tf.data interleaves the shards: every record once, in another order
    assert sorted(i.tobytes() for i in x_uri[..., 0]) == sorted(i.tobytes() for i in images)
    with pytest.raises(CxrError, match=f"no TFRecord shards in {tmp_path.as_uri()}/val "):
        tfrecord_files(tmp_path.as_uri(), "val")
