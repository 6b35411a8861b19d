"""The one training function: search trials, the final model and the tests all call `fit`.

    history = fit(TrainConfig(model=ModelConfig(weights=None, image_size=64), epochs=3), data)
    model = history.model                     # full model: raw uint8 image in, probabilities out
    history.history["val_auc"]                # one value per epoch

Steps of one fit:
1. Seed everything (Keras, numpy, Python; weights and dropout are also seeded per layer).
2. Build the full model and compile it (Adam, cross-entropy with the config's label smoothing,
   accuracy, AUC of P(PNEUMONIA)).
3. If the base is a fixed function (frozen, no augmentation) and the config allows it, train
   only the head, on VGG16 features from the FeatureCache; the head's layers ARE the full
   model's head, so the full model is trained when the head is. Otherwise train end to end.
4. Either way: class-weighted loss, the same seeded batch order, early stopping on METRIC
   (best weights restored); callbacks see loss, accuracy, auc and val_* after every epoch.
"""
from __future__ import annotations

import sys
import time

import keras

from cxr_datasets.progress import format_duration

from .config import METRIC, MODE, TrainConfig
from .data import BatchStream, Data, one_hot, tfrecord_dataset
from .features import FeatureCache
from .model import build_model, compile_model, feature_extractor

VAL_BATCH = 128      # evaluation has no gradients: larger batches are cheaper


def fit(cfg: TrainConfig, data: Data, callbacks=(), feature_cache: FeatureCache | None = None,
        verbose: int = 0) -> keras.callbacks.History:
    """Train one configuration; `history.model` is always the full raw-image model.

    Callbacks see the full model as `self.model` in every case; a `CheckpointCallback` is also
    told which model's optimizer steps (`set_trained_model`)."""
    keras.utils.set_random_seed(cfg.seed)
    model = compile_model(build_model(cfg.model, seed=cfg.seed), cfg)
    if uses_feature_cache(cfg):
        cache = feature_cache if feature_cache is not None else FeatureCache()
        return _fit_head_on_features(model, cfg, data, list(callbacks), cache, verbose)
    return _fit_end_to_end(model, cfg, data, list(callbacks), verbose)


class CheckpointCallback(keras.callbacks.Callback):
    """A callback that saves training state. `self.model` is the full raw-image model (whose
    weights to save); `self.trained_model` is the model whose optimizer steps: the head-on-features
    model while the head trains on cached features, else the full model. `fit` sets it before
    training starts."""

    trained_model: keras.Model

    def set_trained_model(self, model: keras.Model) -> None:
        self.trained_model = model


def _tell_trained_model(callbacks, trained: keras.Model) -> None:
    for callback in callbacks:
        if isinstance(callback, CheckpointCallback):
            callback.set_trained_model(trained)


def uses_feature_cache(cfg: TrainConfig) -> bool:
    return cfg.use_feature_cache and cfg.model.base_is_fixed


def _fit_end_to_end(model, cfg: TrainConfig, data: Data, callbacks, verbose):
    _tell_trained_model(callbacks, model)
    train = _train_input(cfg, data, data.x_train, tfrecords_allowed=True)
    return _run_fit(model, train, (data.x_val, one_hot(data.y_val)), cfg, callbacks, verbose)


def _fit_head_on_features(model, cfg: TrainConfig, data: Data, callbacks, cache, verbose):
    extractor = feature_extractor(model)  # shares the full model's base: same function as keyed
    f_train = cache.features(cfg.model, data.x_train, seed=cfg.seed, extractor=extractor)
    f_val = cache.features(cfg.model, data.x_val, seed=cfg.seed, extractor=extractor)
    trainer = compile_model(_head_on_features(model.get_layer("head")), cfg)
    _tell_trained_model(callbacks, trainer)
    train = _train_input(cfg, data, f_train, tfrecords_allowed=False)
    views = [FullModelView(cb, full=model, trained=trainer) for cb in callbacks]
    history = _run_fit(trainer, train, (f_val, one_hot(data.y_val)), cfg, views, verbose)
    _copy_optimizer_state(trainer, model)
    history.set_model(model)
    return history


def _head_on_features(head: keras.Model) -> keras.Model:
    """A model over the full model's own head layers: training it trains the full model.

    A wrapper rather than compiling the nested head itself, so the saved full model holds no
    second optimizer.
    """
    features = keras.Input(head.input_shape[1:], name="features")
    return keras.Model(features, head(features), name="head_on_features")


def _copy_optimizer_state(trainer: keras.Model, model: keras.Model) -> None:
    # Same trainable variables, same order (the base is frozen): the full model's optimizer can
    # take over Adam's moments, so the saved model resumes training where the head left off and
    # loads without "skipping optimizer variables" warnings.
    model.optimizer.build(model.trainable_variables)
    source, target = trainer.optimizer.variables, model.optimizer.variables
    if [tuple(v.shape) for v in source] == [tuple(v.shape) for v in target]:
        for src, dst in zip(source, target):
            dst.assign(src)


def _train_input(cfg: TrainConfig, data: Data, x, tfrecords_allowed: bool):
    """(what model.fit consumes, steps per epoch, stop function) for the training split.

    x is the images or their cached features (same rows, same seeded order). TFRecord shards
    are streamed with tf.data only for images, on TensorFlow, when the Data names them.
    """
    steps = -(-len(data.y_train) // cfg.batch_size)
    if tfrecords_allowed and data.train_tfrecords and keras.backend.backend() == "tensorflow":
        ds = tfrecord_dataset(list(data.train_tfrecords), data.image_size, cfg.batch_size,
                              seed=cfg.seed, class_weight=data.class_weight)
        return ds.repeat(), steps, lambda: None
    stream = BatchStream(x, data.y_train, cfg.batch_size, seed=cfg.seed,
                         class_weight=data.class_weight)
    return iter(stream), stream.steps_per_epoch, stream.close


def _run_fit(model, train, validation, cfg: TrainConfig, callbacks, verbose):
    batches, steps, stop = train
    early_stop = keras.callbacks.EarlyStopping(monitor=METRIC, mode=MODE, patience=cfg.patience,
                                               restore_best_weights=True)
    try:
        return model.fit(batches, steps_per_epoch=steps, epochs=cfg.epochs,
                         validation_data=validation, validation_batch_size=VAL_BATCH,
                         callbacks=[early_stop, *callbacks], verbose=verbose,
                         shuffle=False)  # batches arrive shuffled (seeded) from `train`
    finally:
        stop()  # end the prefetch thread, also after early stopping or an error


class FullModelView(keras.callbacks.Callback):
    """Shows a callback the full model while only its head is being trained (feature cache).

    An external callback (Tune's report/checkpoint callback) must checkpoint the full raw-image
    model, not the head. The head's layers belong to the full model, so the full model's weights
    are the trained ones; under JAX the training state is first written back to the variables.
    Only hooks the wrapped callback overrides are forwarded (Keras skips per-batch hooks of
    callbacks that do not define them; this keeps that saving). Setting `stop_training` on the
    full model stops the head's fit.
    """

    _HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
              "on_train_batch_begin", "on_train_batch_end", "on_test_begin", "on_test_end",
              "on_test_batch_begin", "on_test_batch_end", "on_batch_begin", "on_batch_end")

    def __init__(self, callback: keras.callbacks.Callback, full: keras.Model, trained: keras.Model):
        super().__init__()
        self.callback, self.full, self.trained = callback, full, trained
        callback.set_model(full)
        for name in self._HOOKS:
            if not _is_default_hook(getattr(callback, name)):
                setattr(self, name, self._forwarder(name))

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(self.full)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def _forwarder(self, name):
        def forward(*args, **kwargs):
            sync = getattr(self.trained, "jax_state_sync", None)
            if sync is not None:
                sync()
            self.full.stop_training = False
            getattr(self.callback, name)(*args, **kwargs)
            if self.full.stop_training:
                self.trained.stop_training = True
        return forward


def _is_default_hook(method) -> bool:
    return getattr(method, "_is_default", False)



class EpochProgress(keras.callbacks.Callback):
    """One line per epoch on stderr: epoch, loss, METRIC, the epoch's time and an ETA.

    The ETA is the mean epoch time so far times the epochs left; early stopping (patience) may
    end the fit sooner, so it is an upper bound. `cxr train` shows it unless --quiet.
    """

    def __init__(self, epochs: int, stream=None):
        super().__init__()
        self.epochs, self.stream = epochs, stream
        self._start = self._epoch_start = 0.0

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        now = time.perf_counter()
        done = epoch + 1
        eta = (now - self._start) / done * (self.epochs - done)
        print(f"epoch {done}/{self.epochs}  loss {logs.get('loss', float('nan')):.4f}  "
              f"{METRIC} {logs.get(METRIC, float('nan')):.4f}  {now - self._epoch_start:.1f} s"
              + (f"  ETA <= {format_duration(eta)}" if done < self.epochs else ""),
              file=self.stream or sys.stderr, flush=True)
