"""The VGG16 transfer-learning model: raw uint8 grayscale pixels in, P(NORMAL), P(PNEUMONIA) out.

    model = build_model(ModelConfig(image_size=224, weights="imagenet"), seed=0)
    compile_model(model, TrainConfig(lr=1e-4))
    probs = predict_proba(model, images_uint8)          # P(PNEUMONIA), shape [N]

Layers of the full model (names are stable; Grad-CAM and the exporter rely on them):
    "image"           Input uint8 [S, S, 1], the array `cxr prepare` wrote
    "augment"         XrayAugment, only when aug_strength > 0 or hflip; active in training only
    "vgg_preprocess"  VGGPreprocess: gray -> 3 channels, VGG16's caffe-style BGR mean subtraction
    "vgg16"           nested keras.applications.VGG16 base (include_top=False), called with
                      training=False; its conv layers are block{1..5}_conv{n}, last "block5_conv3"
    "head"            nested model: pooling, [Dense+ReLU, Dropout] per head_units, "probs"
                      Dense(2, softmax, float32)
Preprocessing lives in the model so an exported model takes the same raw input as training.

`inference_model(model)` is the graph that is exported: the same base and head (shared weights) behind
a preprocessing block of built-in Keras layers, and no augmentation (a no-op at inference). It loads
with plain Keras 3 in safe mode, on any backend, in a Python that has never seen this project.
The base and head are nested models so that `build_base` (for the feature cache) and `build_head`
(trained on cached features) are the very functions used inside the full model: a head trained on
features drops into the full model unchanged.

Determinism: every weight that is not loaded from a file is drawn from an initializer seeded by
(`seed`, layer name), including the base when weights=None. The same config and seed give the same
model in any process, which is what makes cached features valid across trials.
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
import zlib
from pathlib import Path

import keras
import numpy as np
from keras import ops

from cxr_datasets.errors import CxrError, first_line

from .augment import augmentation_layer
from .config import VGG16_BLOCKS, ModelConfig, TrainConfig

# Keras's own location and checksum of the ImageNet VGG16 weights without the classifier top.
VGG16_NOTOP_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                   "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"
# VGG16 was trained on BGR images with these per-channel means subtracted (caffe style).
VGG16_BGR_MEAN = (103.939, 116.779, 123.68)
PNEUMONIA = 1  # column of P(PNEUMONIA) in the output; cxr_datasets.CLASS_NAMES order


@keras.saving.register_keras_serializable(package="cxr_model")
class VGGPreprocess(keras.layers.Layer):
    """Gray [.., 1] in [0, 255] -> VGG16 input [.., 3]: BGR order, ImageNet channel means removed.

    Equal to `keras.applications.vgg16.preprocess_input` on the gray image repeated to RGB; a
    gray image is the same in RGB and BGR, so only the three means differ per channel.
    """

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        mean = ops.convert_to_tensor(VGG16_BGR_MEAN, dtype=self.compute_dtype)
        return images - mean  # broadcasts [.., 1] against [3]: gray -> 3 channels in one op

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)


@keras.saving.register_keras_serializable(package="cxr_model")
class ClassAUC(keras.metrics.AUC):
    """ROC AUC of one softmax column (P(PNEUMONIA)), from one-hot targets.

    Keras's AUC on a two-column softmax would pool both columns; the clinical number is the AUC
    of the PNEUMONIA probability alone.
    """

    def __init__(self, class_index: int = PNEUMONIA, **kwargs):
        super().__init__(**kwargs)
        self.class_index = class_index

    def update_state(self, y_true, y_pred, sample_weight=None):
        column = self.class_index
        return super().update_state(y_true[:, column], y_pred[:, column], sample_weight)

    def get_config(self):
        return {**super().get_config(), "class_index": self.class_index}


def build_model(cfg: ModelConfig, *, seed: int = 0) -> keras.Model:
    """The full model (uncompiled): uint8 [S, S, 1] -> softmax [2]; see the module docstring."""
    image = keras.Input((cfg.image_size, cfg.image_size, 1), dtype="uint8", name="image")
    x = image
    if cfg.augments:
        x = augmentation_layer(cfg.aug_strength, cfg.hflip, seed=derive_seed(seed, "augment"))(x)
    x = VGGPreprocess(name="vgg_preprocess")(x)
    base = build_vgg16(cfg, seed=seed)
    features = base(x, training=False)  # no BN in VGG16, but keeps the keras-io contract
    head = build_head(cfg, tuple(features.shape[1:]), seed=seed)
    return keras.Model(image, head(features), name="cxr_vgg16")


def inference_model(model: keras.Model) -> keras.Model:
    """The portable inference graph of a full model: uint8 [S, S, 1] -> softmax [2], built-in layers only.

    Shares the base and head layers (and so the weights) of `model`; the augmentation layer is left
    out (it is the identity outside training) and VGGPreprocess is replaced by `builtin_preprocess`,
    which computes the very same float32 values. Used by the exporter, so model.keras needs no
    cxr-tune code to load.
    """
    if model.name == ENSEMBLE_NAME:  # already the portable graph
        return model
    size = model.input_shape[1]
    image = keras.Input((size, size, 1), dtype="uint8", name="image")
    x = builtin_preprocess(size)(image)
    features = model.get_layer("vgg16")(x, training=False)
    probs = model.get_layer("head")(features, training=False)
    return keras.Model(image, probs, name="cxr_vgg16_inference")


ENSEMBLE_NAME = "cxr_vgg16_ensemble"


def ensemble_model(members: list[keras.Model]) -> keras.Model:
    """One portable graph whose output is the mean of the members' softmax outputs.

    members: full models of one architecture (e.g. the K fold models of a cross-validated
    configuration). Built-in layers only, like `inference_model`: the preprocessing once, then
    when every member has the same VGG16 weights (a frozen base: the folds differ in their heads
    only) ONE base feeding K heads, else K bases; `Average` takes the mean of the K softmax outputs,
    so rows still sum to 1. With one shared base, Grad-CAM (block5_conv3) explains the ensemble.
    The weights are copied: the ensemble does not share variables with `members`.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    size = members[0].input_shape[1]
    image = keras.Input((size, size, 1), dtype="uint8", name="image")
    x = builtin_preprocess(size)(image)
    cfgs = [_base_and_head(m) for m in members]
    shared = all(_same_weights(cfgs[0][0], base) for base, _ in cfgs[1:])
    outputs = []
    if shared:
        base = _copy_of(cfgs[0][0], "vgg16")
        features = base(x, training=False)
        for k, (_, head) in enumerate(cfgs, start=1):
            outputs.append(_copy_of(head, f"head_fold{k}")(features, training=False))
    else:
        for k, (base, head) in enumerate(cfgs, start=1):
            features = _copy_of(base, f"vgg16_fold{k}")(x, training=False)
            outputs.append(_copy_of(head, f"head_fold{k}")(features, training=False))
    probs = keras.layers.Average(name="fold_mean")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(image, probs, name=ENSEMBLE_NAME)


def _base_and_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    return model.get_layer("vgg16"), model.get_layer("head")


def _same_weights(a: keras.Model, b: keras.Model) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(wa, wb))


def _copy_of(model: keras.Model, name: str) -> keras.Model:
    """A fresh copy of a nested model (same layers, same weights), under another name."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.name = name
    return clone


def builtin_preprocess(size: int) -> keras.Model:
    """VGGPreprocess as a nested model of built-in layers, named "vgg_preprocess" like it.

    Concatenate repeats the gray channel three times (uint8, exact); Rescaling(1, offset=-mean)
    casts to the compute dtype and adds the negated BGR means: x * 1 + (-m) is bit-identical to
    VGGPreprocess's x - m.
    """
    gray = keras.Input((size, size, 1), dtype="uint8", name="gray")
    three = keras.layers.Concatenate(axis=-1, name="gray_to_3ch")([gray, gray, gray])
    centred = keras.layers.Rescaling(1.0, offset=[-m for m in VGG16_BGR_MEAN], name="bgr_mean")(three)
    return keras.Model(gray, centred, name="vgg_preprocess")


def build_base(cfg: ModelConfig, *, seed: int = 0) -> keras.Model:
    """Raw uint8 [S, S, 1] -> VGG16 feature maps: the fixed function the feature cache stores."""
    return _features_model(cfg.image_size, VGGPreprocess(name="vgg_preprocess"),
                           build_vgg16(cfg, seed=seed))


def feature_extractor(model: keras.Model) -> keras.Model:
    """Raw uint8 -> VGG16 features, sharing the layers (and weights) of a full model."""
    size = model.input_shape[1]
    return _features_model(size, model.get_layer("vgg_preprocess"), model.get_layer("vgg16"))


def _features_model(size: int, preprocess, base) -> keras.Model:
    image = keras.Input((size, size, 1), dtype="uint8", name="image")
    return keras.Model(image, base(preprocess(image), training=False), name="vgg16_features")


def build_head(cfg: ModelConfig, feature_shape: tuple[int, ...], *, seed: int = 0) -> keras.Model:
    """VGG16 feature maps -> softmax [2]: pooling, Dense+ReLU+Dropout per head_units entry."""
    features = keras.Input(tuple(feature_shape), name="features")
    if cfg.head_pooling == "flatten":
        x = keras.layers.Flatten(name="flatten")(features)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    for i, units in enumerate(cfg.head_units):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}",
                               kernel_initializer=_glorot(seed, f"head/dense_{i}"))(x)
        x = keras.layers.Dropout(cfg.dropout, seed=derive_seed(seed, f"head/dropout_{i}"),
                                 name=f"dropout_{i}")(x)
    # float32 output even under mixed precision: softmax and the loss need the range.
    probs = keras.layers.Dense(2, activation="softmax", dtype="float32", name="probs",
                               kernel_initializer=_glorot(seed, "head/probs"))(x)
    return keras.Model(features, probs, name="head")


def build_vgg16(cfg: ModelConfig, *, seed: int = 0) -> keras.Model:
    """keras.applications.VGG16 without top, weights per cfg.weights, last k blocks trainable."""
    size = cfg.image_size
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    if cfg.weights is None:
        _seeded_init(base, seed)
    else:
        _load_base_weights(base, resolve_weights(cfg.weights))
    set_trainable_blocks(base, cfg.trainable_blocks)
    return base


def set_trainable_blocks(base: keras.Model, k: int) -> None:
    """Unfreeze the last k of VGG16's five conv blocks (k = 0: the whole base is frozen)."""
    base.trainable = k > 0  # the setter recurses into every layer, so set it first
    first = VGG16_BLOCKS - k + 1
    for layer in base.layers:
        match = re.match(r"block(\d)_", layer.name)
        layer.trainable = match is not None and int(match.group(1)) >= first and k > 0


def compile_model(model: keras.Model, cfg: TrainConfig) -> keras.Model:
    """Adam(cfg.lr), categorical cross-entropy on one-hot labels (cfg.label_smoothing), accuracy and
    AUC of P(PNEUMONIA), logged as "auc" (so "val_auc" on validation: config.METRIC).

    Takes the whole TrainConfig so that an optimiser or loss setting added to it is wired here only.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.lr),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"), ClassAUC(name="auc")],
    )
    return model


def predict_proba(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(PNEUMONIA) for uint8 images [N, S, S(, 1)], as float64 [N]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if len(images) == 0:
        return np.zeros((0,), np.float64)
    probs = model.predict(images, batch_size=batch_size, verbose=0)
    return np.asarray(probs[:, PNEUMONIA], dtype=np.float64)


def derive_seed(seed: int, name: str) -> int:
    """A stable per-layer seed: the same in every process (unlike Python's salted hash())."""
    return zlib.crc32(f"{seed}/{name}".encode()) & 0x7FFFFFFF


def _glorot(seed: int, name: str):
    return keras.initializers.GlorotUniform(seed=derive_seed(seed, name))


def _seeded_init(base: keras.Model, seed: int) -> None:
    # VGG16(weights=None) draws from the global RNG; redraw from per-layer seeds instead so the
    # random base is a function of `seed` alone (the feature cache keys on it).
    for layer in base.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.kernel.assign(_glorot(seed, f"vgg16/{layer.name}")(layer.kernel.shape))
            layer.bias.assign(ops.zeros(layer.bias.shape))


# --- weights: ImageNet download under a file lock, or a local file -------------------------------

def resolve_weights(weights: str) -> Path:
    """Path of the weights file for cfg.weights ("imagenet" or a local path)."""
    if weights == "imagenet":
        return imagenet_weights_path()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CxrError(f"VGG16 weights file not found: {path} (use --weights imagenet, none or PATH)")
    return path


def imagenet_weights_path() -> Path:
    """Download (once) the ImageNet VGG16 weights into Keras's cache; a file lock serialises it.

    Concurrent trials on one node would otherwise write the same cache file at once and corrupt
    it. Offline, this fails with one line naming the two ways to run without a download.
    """
    return _imagenet_weights_in(_keras_home() / "models")


# Keyed by the cache folder (KERAS_HOME may change): keras.utils.get_file re-hashes the 58 MB file
# on every call, so each process checks it once. A failure raises and is not cached.
@functools.lru_cache(maxsize=1)
def _imagenet_weights_in(models_dir: Path) -> Path:
    from filelock import FileLock

    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / (VGG16_NOTOP_FILE + ".lock"))):
        try:
            path = keras.utils.get_file(VGG16_NOTOP_FILE, VGG16_NOTOP_URL,
                                        cache_dir=str(models_dir.parent), cache_subdir="models",
                                        file_hash=VGG16_NOTOP_MD5)
        except Exception as exc:  # urllib, SSL, hash mismatch: all mean "no usable weights"

            raise CxrError(
                f"cannot download the ImageNet VGG16 weights ({first_line(exc, limit=160)}); run offline with "
                f"--weights none (random init) or --weights PATH (a local {VGG16_NOTOP_FILE})"
            ) from exc
    return Path(path)


def _keras_home() -> Path:
    # Keras's own cache location, so a download here is found by keras.applications too.
    home = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
    try:
        (home / "models").mkdir(parents=True, exist_ok=True)
        return home
    except OSError:  # read-only home: Keras falls back to /tmp/.keras as well
        return Path(tempfile.gettempdir()) / ".keras"


def _load_base_weights(base: keras.Model, path: Path) -> None:
    try:
        base.load_weights(str(path))
    except Exception as exc:  # wrong file, wrong architecture, truncated HDF5

        raise CxrError(f"cannot load VGG16 (no top) weights from {path}: {first_line(exc, limit=160)}") from exc
