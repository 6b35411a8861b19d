"""XrayAugment: identity when off, random and in range when on, one resampler on every backend."""
import keras
import numpy as np
import pytest

from cxr_model.augment import AUG_MAX, XrayAugment, augmentation_layer, bilinear_affine


def _images(n=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 200, (n, size, size, 1)).astype(np.float32)
    x[:, 8:24, 12:20] = 255.0  # a bright block, so geometric changes show
    return x


def _run(layer, x, training):
    return keras.ops.convert_to_numpy(layer(x, training=training))


def test_identity_at_strength_zero_even_in_training():
    x = _images()
    np.testing.assert_array_equal(_run(augmentation_layer(0.0, seed=0), x, True), x)


def test_identity_at_inference():
    x = _images()
    layer = augmentation_layer(1.0, hflip=True, seed=0)
    np.testing.assert_array_equal(_run(layer, x, False), x)
    np.testing.assert_array_equal(_run(layer, x, None), x)


def test_training_varies_per_image_and_per_call_and_stays_in_range():
    x = np.repeat(_images(1), 8, axis=0)  # eight copies of one image
    layer = augmentation_layer(1.0, seed=0)
    first, second = _run(layer, x, True), _run(layer, x, True)
    assert first.min() >= 0.0 and first.max() <= 255.0
    assert not np.allclose(first[0], first[1])  # per-image parameters
    assert not np.allclose(first, second)       # new draws on every call
    assert np.abs(first - x).mean() > 1.0


def test_seed_reproduces_draws():
    x = _images()
    a = _run(augmentation_layer(0.5, seed=3), x, True)
    b = _run(augmentation_layer(0.5, seed=3), x, True)
    np.testing.assert_allclose(a, b)


def test_strength_scales_every_maximum():
    layer = augmentation_layer(0.5, hflip=False, seed=0)
    assert layer.rotation_deg == pytest.approx(0.5 * AUG_MAX["rotation_deg"])
    assert layer.translation == pytest.approx(0.5 * AUG_MAX["translation"])
    assert layer.contrast == pytest.approx(0.5 * AUG_MAX["contrast"])
    with pytest.raises(ValueError):
        augmentation_layer(1.5)


def test_translation_moves_content_within_its_maximum():
    x = np.zeros((16, 40, 40, 1), np.float32)
    x[:, 18:22, 18:22] = 255.0
    y = _run(XrayAugment(translation=0.1, seed=0), x, True)
    cols = np.arange(40)
    centres = (y[..., 0].sum(axis=1) * cols).sum(axis=1) / y[..., 0].sum(axis=(1, 2))
    assert np.all(np.abs(centres - 19.5) <= 0.1 * 40 + 0.5)
    assert np.ptp(centres) > 1.0


def test_hflip_only_mirrors():
    x = _images(16)
    y = _run(XrayAugment(hflip=True, seed=1), x, True)
    flipped = np.array([np.allclose(a, b[:, ::-1]) for a, b in zip(y, x)])
    kept = np.array([np.allclose(a, b) for a, b in zip(y, x)])
    assert np.all(flipped | kept) and flipped.any() and kept.any()


def test_own_resampler_matches_keras_affine_transform():
    # The layer uses Keras's affine_transform on TensorFlow and bilinear_affine elsewhere.
    x = _images(4, 24)
    theta = np.deg2rad([0.0, 10.0, -7.0, 3.0])
    rows = np.stack([np.cos(theta) * 1.1, -np.sin(theta), [0.0, 2.5, -3.2, 0.7],
                     np.sin(theta), np.cos(theta) * 0.9, [0.0, -1.5, 2.0, 0.3],
                     np.zeros(4), np.zeros(4)], axis=1).astype(np.float32)
    ours = keras.ops.convert_to_numpy(bilinear_affine(x, rows))
    ref = keras.ops.convert_to_numpy(keras.ops.image.affine_transform(
        x, rows, interpolation="bilinear", fill_mode="constant", fill_value=0))
    np.testing.assert_allclose(ours, ref, atol=0.05)


def test_layer_config_round_trip():
    layer = augmentation_layer(0.3, hflip=True, seed=5)
    clone = XrayAugment.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
