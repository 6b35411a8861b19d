"""fit: learns, reports val_auc each epoch, and the feature-cache path equals end-to-end training."""
import warnings

import keras
import numpy as np
import pytest

from cxr_model import Data, FeatureCache, ModelConfig, TrainConfig, fit, predict_proba

SIZE = 32


def _learnable(n, seed):
    """Dark noise; PNEUMONIA images carry a bright square, so a random VGG16 + head can learn it."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    x = rng.integers(0, 80, (n, SIZE, SIZE, 1)).astype(np.uint8)
    x[y == 1, 10:22, 10:22] += 120
    return x, y


@pytest.fixture(scope="module")
def data():
    (xt, yt), (xv, yv) = _learnable(48, 0), _learnable(24, 1)
    return Data(xt, yt, xv, yv)


def _cfg(**kwargs):
    model = {"image_size": SIZE, "weights": None, "head_units": (16,), "head_pooling": "avg",
             "dropout": 0.2, "aug_strength": 0.0, **kwargs.pop("model", {})}
    return TrainConfig(model=ModelConfig(**model), **{"lr": 1e-3, "batch_size": 16,
                                                       "epochs": 3, "seed": 0, **kwargs})


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs, self.model_names = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))
        self.model_names.append(self.model.name)


def test_end_to_end_with_augmentation_learns_and_reports_every_epoch(data):
    recorder = Recorder()
    history = fit(_cfg(model={"aug_strength": 0.3}, epochs=4, patience=4), data,
                  callbacks=[recorder])
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    assert len(recorder.logs) == 4
    for logs in recorder.logs:
        assert {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"} <= set(logs)
    assert history.history["val_auc"][-1] > 0.8
    assert history.model.name == "cxr_vgg16"


def test_head_on_cached_features_equals_end_to_end(data):
    cfg = _cfg(epochs=3)
    recorder = Recorder()
    cached = fit(cfg, data, callbacks=[recorder], feature_cache=FeatureCache())
    direct = fit(TrainConfig.from_dict({**cfg.to_dict(), "use_feature_cache": False}), data)
    assert cached.model.name == direct.model.name == "cxr_vgg16"
    assert recorder.model_names == ["cxr_vgg16"] * 3  # callbacks saw the full model
    np.testing.assert_allclose(predict_proba(cached.model, data.x_val),
                               predict_proba(direct.model, data.x_val), atol=1e-4)
    np.testing.assert_allclose(cached.history["loss"], direct.history["loss"], rtol=1e-4)


def test_feature_cache_on_disk_is_shared_and_keyed(data, tmp_path):
    cfg = ModelConfig(image_size=SIZE, weights=None, aug_strength=0.0)
    first = FeatureCache(tmp_path)
    features = first.features(cfg, data.x_train, seed=0)
    assert first.computed == 1 and len(list(tmp_path.glob("*.npy"))) == 1
    other_process = FeatureCache(tmp_path)  # a second trial on the node: reads, never computes
    np.testing.assert_array_equal(other_process.features(cfg, data.x_train, seed=0), features)
    assert other_process.computed == 0
    keys = {first.key(cfg, data.x_train, seed=0), first.key(cfg, data.x_train, seed=1),
            first.key(cfg, data.x_val, seed=0),
            first.key(ModelConfig(image_size=SIZE, weights="imagenet", aug_strength=0.0),
                      data.x_train)}
    assert len(keys) == 4
    changed = data.x_train.copy()
    changed[5, 3, 3, 0] ^= 1  # one pixel of one image
    assert first.key(cfg, changed, seed=0) != first.key(cfg, data.x_train, seed=0)
    with pytest.raises(ValueError, match="fixed"):
        first.features(ModelConfig(image_size=SIZE, weights=None, aug_strength=0.2), data.x_train)


def test_a_callback_can_stop_training_in_the_feature_path(data):
    class StopAfterFirst(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    history = fit(_cfg(epochs=5), data, callbacks=[StopAfterFirst()])
    assert len(history.history["loss"]) == 1


def test_fit_on_a_prepared_folder(prepared_small):
    data = Data.from_prepared(prepared_small)
    history = fit(_cfg(epochs=1), data)
    assert np.isfinite(history.history["val_loss"][0])
    assert predict_proba(history.model, data.x_val).shape == (len(data.y_val),)


def test_fit_streams_tfrecords_on_tensorflow(data, tmp_path):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.data path is TensorFlow-only")
    import pandas as pd

    from cxr_datasets.shards import write_tfrecord_shards
    from cxr_model.data import tfrecord_files

    x, y = data.x_train, data.y_train
    rows = pd.DataFrame({"image": [i[..., 0].tobytes() for i in x], "height": SIZE, "width": SIZE,
                         "label": y, "label_name": "x", "patient_id": "p", "source_path": "x"})
    write_tfrecord_shards(rows, "train", tmp_path, rows_per_shard=20)
    streamed = Data(x, y, data.x_val, data.y_val,
                    train_tfrecords=tuple(tfrecord_files(tmp_path, "train")))
    history = fit(_cfg(epochs=2, model={"aug_strength": 0.1}), streamed)
    assert len(history.history["val_auc"]) == 2


def test_model_trained_on_features_saves_loads_and_splits_for_grad_cam(data, tmp_path):
    history = fit(_cfg(epochs=1), data)  # feature path: the base was also called by the extractor
    path = tmp_path / "model.keras"
    history.model.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.saving.load_model(path, safe_mode=True)
    assert not [w for w in caught if "optimizer" in str(w.message)]  # it carries Adam's state
    np.testing.assert_allclose(predict_proba(loaded, data.x_val),
                               predict_proba(history.model, data.x_val), atol=1e-6)
    base = history.model.get_layer("vgg16")
    assert base._inbound_nodes[0].operation is base  # first call: the full model's own


def test_label_smoothing_is_the_loss_that_trains(data):
    """TrainConfig.label_smoothing reaches the compiled loss of both fit paths: the full model's
    validation loss equals cross-entropy against (1 - s) * one-hot + s / 2, computed by hand."""
    for cached in (True, False):
        cfg = _cfg(epochs=1, label_smoothing=0.2, use_feature_cache=cached)
        history = fit(cfg, data)
        model = history.model
        assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.2)
        probs = np.clip(np.asarray(model.predict(data.x_val, verbose=0), np.float64), 1e-7, 1 - 1e-7)
        target = 0.8 * np.eye(2)[data.y_val] + 0.1
        expected = float(np.mean(-(target * np.log(probs)).sum(axis=1)))
        logged = model.evaluate(data.x_val, np.eye(2)[data.y_val], verbose=0, return_dict=True)["loss"]
        assert logged == pytest.approx(expected, rel=1e-4)
        plain = -np.log(probs[np.arange(len(probs)), data.y_val]).mean()
        assert abs(expected - plain) > 1e-3  # the smoothing changes the loss: the check can fail
