"""build_model: input/output contract, preprocessing, freezing, determinism, weights, save/load."""
import keras
import numpy as np
import pytest

from cxr_datasets import CxrError
from cxr_model import ModelConfig, TrainConfig, VGGPreprocess, build_base, build_head, build_model, predict_proba
from cxr_model.model import ClassAUC, compile_model

SIZE = 32  # VGG16's minimum: 1x1 feature maps after five pools


def _cfg(**kwargs):
    return ModelConfig(**{"image_size": SIZE, "weights": None, "head_units": (8,), **kwargs})


def _pixels(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 1)).astype(np.uint8)


def _kernels(model):
    return model.get_weights()


def test_contract_uint8_in_float32_probabilities_out():
    model = build_model(_cfg(aug_strength=0.2))
    assert model.input.dtype == "uint8" and tuple(model.input.shape) == (None, SIZE, SIZE, 1)
    probs = keras.ops.convert_to_numpy(model(_pixels()))
    assert probs.shape == (6, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert predict_proba(model, _pixels()[..., 0]).shape == (6,)  # [N, S, S] accepted too


def test_layer_names_grad_cam_and_export_rely_on():
    model = build_model(_cfg(aug_strength=0.2))
    names = [layer.name for layer in model.layers]
    assert names == ["image", "augment", "vgg_preprocess", "vgg16", "head"]
    assert model.get_layer("vgg16").get_layer("block5_conv3") is not None
    assert "augment" not in [layer.name for layer in build_model(_cfg(aug_strength=0.0)).layers]
    assert not any(type(layer).__name__ == "Lambda" for layer in model._flatten_layers())


def test_preprocessing_equals_keras_vgg16_preprocess_input():
    gray = _pixels(3).astype(np.float32)
    ours = keras.ops.convert_to_numpy(VGGPreprocess()(gray))
    rgb = np.repeat(gray, 3, axis=-1)
    ref = keras.applications.vgg16.preprocess_input(rgb.copy())
    np.testing.assert_allclose(ours, keras.ops.convert_to_numpy(ref), atol=1e-4)


@pytest.mark.parametrize("k", [0, 2, 5])
def test_trainable_blocks_unfreezes_the_last_k_blocks(k):
    base = build_model(_cfg(trainable_blocks=k)).get_layer("vgg16")
    trainable_blocks = {int(layer.name[5]) for layer in base.layers
                        if layer.name.startswith("block") and layer.trainable and layer.weights}
    assert trainable_blocks == set(range(6 - k, 6))
    expected = sum(np.prod(v.shape) for layer in base.layers if layer.name.startswith("block")
                   and int(layer.name[5]) > 5 - k for v in layer.weights)
    assert sum(np.prod(v.shape) for v in base.trainable_weights) == expected


def test_head_shapes_for_both_poolings():
    for pooling, units in (("flatten", (16, 8)), ("avg", (4,))):
        head = build_head(_cfg(head_pooling=pooling, head_units=units), (2, 2, 512))
        dense = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)]
        assert [d.units for d in dense] == [*units, 2]
        assert dense[0].kernel.shape[0] == (2 * 2 * 512 if pooling == "flatten" else 512)
        assert head.get_layer("probs").dtype_policy.compute_dtype == "float32"


def test_same_seed_same_model_other_seed_other_model():
    a, b, c = (build_model(_cfg(), seed=s) for s in (1, 1, 2))
    for wa, wb in zip(_kernels(a), _kernels(b)):
        np.testing.assert_array_equal(wa, wb)
    assert not np.allclose(_kernels(a)[0], _kernels(c)[0])


def test_build_base_is_the_models_base():
    x = _pixels()
    base_out = keras.ops.convert_to_numpy(build_base(_cfg(), seed=4).predict(x, verbose=0))
    model = build_model(_cfg(), seed=4)
    ref = model.get_layer("vgg16")(model.get_layer("vgg_preprocess")(x))
    np.testing.assert_allclose(base_out, keras.ops.convert_to_numpy(ref), rtol=1e-5, atol=1e-5)


def test_save_load_keras_safe_mode_same_outputs(tmp_path):
    model = compile_model(build_model(_cfg(aug_strength=0.3, hflip=True)), TrainConfig(lr=1e-3))
    model.optimizer.build(model.trainable_variables)  # as after training
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _pixels()
    np.testing.assert_allclose(predict_proba(loaded, x), predict_proba(model, x), atol=1e-6)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]


def test_local_weights_file_is_loaded(tmp_path):
    source = build_model(_cfg(), seed=9).get_layer("vgg16")
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    loaded = build_model(_cfg(weights=str(path)), seed=0).get_layer("vgg16")
    for a, b in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_missing_weights_file_is_one_clear_line(tmp_path):
    with pytest.raises(CxrError, match="not found"):
        build_model(_cfg(weights=str(tmp_path / "nope.h5")))


def test_offline_imagenet_error_names_both_ways_out(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(CxrError) as err:
        build_model(_cfg(weights="imagenet"))
    message = str(err.value)
    assert "\n" not in message and "--weights none" in message and "--weights PATH" in message
    assert (tmp_path / "models").is_dir()  # the lock lives beside Keras's cache


def test_auc_is_on_the_pneumonia_column():
    metric = ClassAUC(name="auc")
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    # column 1 ranks perfectly; column 0 is deliberately not its complement
    p = np.array([[0.9, 0.1], [0.1, 0.2], [0.9, 0.8], [0.1, 0.9]], np.float32)
    metric.update_state(y, p)
    assert float(metric.result()) == pytest.approx(1.0)
