"""Grad-CAM heatmaps from VGG16's last conv layer (block5_conv3), and overlays written as PNGs.

    from cxr_model.gradcam import gradcam_heatmaps, write_overlays
    heat = gradcam_heatmaps(model, images)              # float [N, h, w] in [0, 1], h = S / 16
    write_overlays(images, heat, ["a.png", "b.png"])     # [image | heatmap over image] side by side

Grad-CAM (Selvaraju et al. 2017): weight each channel of the conv activations by the mean gradient
of the class score over the image, sum, keep the positive part. The score is the log-odds of
PNEUMONIA, log p1 - log p0 (the pre-softmax logit difference): it does not saturate the way the
probability does, so confident cases still get a map. Red = evidence for PNEUMONIA.

Backend-agnostic: the model is split with Keras functional graphs and run with keras.ops; only the
gradient itself differs per backend, in `_value_and_grad`.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cxr_datasets.errors import CxrError

TARGET_LAYER = "block5_conv3"
MIN_OVERLAY_SIZE = 256  # small images are upscaled so the overlay is readable
ALPHA = 0.4  # heatmap opacity over the X-ray


def gradcam_heatmaps(model, images, layer_name: str = TARGET_LAYER, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps for PNEUMONIA, float32 [N, h, w] in [0, 1] (each map divided by its maximum)."""
    import keras

    bases = [layer.name for layer in model.layers if layer.name.startswith("vgg16_fold")]
    if len(bases) > 1:
        raise CxrError(f"Grad-CAM explains one VGG16 base, and this model is an ensemble of {len(bases)} "
                       "fine-tuned ones (cxr search --cv with trainable blocks): leave out --gradcam")
    to_conv, from_conv = split_at_layer(model, layer_name)

    def pneumonia_log_odds(conv):
        probs = from_conv(conv, training=False)
        eps = 1e-7  # a softmax in float32 can round a class to exactly 0
        return keras.ops.log(probs[:, 1] + eps) - keras.ops.log(probs[:, 0] + eps)

    maps = []
    for start in range(0, len(images), batch_size):
        conv = to_conv(images[start:start + batch_size], training=False)
        _, grads = _value_and_grad(pneumonia_log_odds, conv)
        maps.append(_cam(keras.ops.convert_to_numpy(conv), keras.ops.convert_to_numpy(grads)))
    return np.concatenate(maps).astype(np.float32)


def split_at_layer(model, layer_name: str):
    """(to_layer, from_layer): two keras Models whose composition is `model`, cut after `layer_name`.

    The layer may sit in `model` itself or in a nested model (the VGG16 base), at any depth; each
    nested model on the way must be called once.
    """
    import keras

    if _has_layer(model, layer_name):
        cut = model.get_layer(layer_name).output
        return keras.Model(model.inputs[0], cut), keras.Model(cut, model.outputs[0])
    for inner in model.layers:
        if isinstance(inner, keras.Model) and _contains(inner, layer_name):
            node = inner._inbound_nodes[0]  # where `model` calls the nested model (the base)
            before = keras.Model(model.inputs[0], node.input_tensors[0])
            after = keras.Model(node.output_tensors[0], model.outputs[0])
            inner_to, inner_from = split_at_layer(inner, layer_name)
            return _chain(before, inner_to), _chain(inner_from, after)
    raise ValueError(f"layer {layer_name!r} not found in model {model.name!r}: Grad-CAM needs a VGG16 base")


def write_overlays(images, heatmaps, paths) -> list[Path]:
    """One PNG per image: the X-ray and the heatmap over it, side by side. Returns the paths."""
    written = []
    for image, heat, path in zip(images, heatmaps, paths):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _overlay_image(np.asarray(image)[..., 0], heat).save(path)
        written.append(path)
    return written


def overlay_png(image, heatmap) -> bytes:
    """The overlay of `write_overlays` for one uint8 image [S, S, 1] and its heatmap, as PNG bytes."""

    buffer = io.BytesIO()
    _overlay_image(np.asarray(image)[..., 0], heatmap).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- internals


def _value_and_grad(fn, x):
    """(fn(x), d sum(fn(x)) / dx) with the active Keras backend's autodiff: the one backend branch.

    fn maps a batch to one score per sample and samples do not interact (no batch norm in training
    mode), so the gradient of the sum is each sample's own gradient.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return y, tape.gradient(y, x)
    if backend == "jax":
        import jax

        y, vjp = jax.vjp(fn, x)
        return y, vjp(jax.numpy.ones_like(y))[0]
    if backend == "torch":
        import torch

        x = x.detach().requires_grad_(True)
        y = fn(x)
        return y, torch.autograd.grad(y.sum(), x)[0]
    raise NotImplementedError(f"Grad-CAM has no gradient for the {backend!r} backend")


def _cam(conv: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM from activations and gradients [N, h, w, C]: ReLU(sum_c mean_hw(grad) * conv)."""
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cam = np.maximum((weights * conv).sum(axis=-1), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)


def _overlay_image(gray: np.ndarray, heat: np.ndarray):
    """PIL RGB image [gray | gray with the jet-coloured heatmap blended in], upscaled if small."""
    from matplotlib import colormaps
    from PIL import Image

    size = gray.shape[0]
    heat_full = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F")
                           .resize((gray.shape[1], size), Image.Resampling.BILINEAR))
    rgb = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    coloured = colormaps["jet"](np.clip(heat_full, 0, 1))[..., :3]
    blended = (1 - ALPHA) * rgb + ALPHA * coloured
    pair = np.concatenate([rgb, blended], axis=1)
    image = Image.fromarray((pair * 255).round().astype(np.uint8))
    if size < MIN_OVERLAY_SIZE:
        scale = -(-MIN_OVERLAY_SIZE // size)
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BILINEAR)
    return image


def _has_layer(model, name: str) -> bool:
    return any(layer.name == name for layer in model.layers)


def _contains(model, name: str) -> bool:
    import keras

    return _has_layer(model, name) or any(
        isinstance(inner, keras.Model) and _contains(inner, name) for inner in model.layers)


def _chain(first, second):
    """first then second, called like a Keras model."""
    return lambda x, training=False: second(first(x, training=training), training=training)
