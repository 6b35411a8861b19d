"""Training-time augmentation of grayscale radiographs: one Keras layer, one resampling per image.

    layer = augmentation_layer(strength=0.2, hflip=False, seed=0)
    y = layer(images_float_0_255, training=True)     # [B, H, W, 1] -> same shape, values in [0, 255]

One `aug_strength` in [0, 1] scales every maximum in `AUG_MAX` at once, so a search needs one
knob instead of six. At strength s each image gets, drawn uniformly and independently:
rotation within +-15s degrees, a shift within +-10s % of width and height, a shear factor within
+-0.15s, a zoom factor within 1 +- 0.15s, a contrast factor within 1 +- 0.2s and a brightness shift
within +-0.2s of full scale. Outside training (predict, evaluate) the layer does nothing.

Horizontal flip is a separate flag, off by default: the heart sits on the left, so a mirrored
chest film is anatomically wrong, and a model could learn to accept such images.

Why a custom layer: Keras's RandomRotation/RandomTranslation/RandomZoom/RandomShear each resample
the image (four bilinear passes, four rounds of blur) and all declare `supports_jit = False`, so a
model that contains any of them is never jit-compiled: under JAX the whole training step then
runs op by op (on a GPU, far slower than the same model without them). This layer
composes rotation, shift, shear, zoom and flip into one affine matrix per image and resamples
once. The resampler is TensorFlow's native kernel (`keras.ops.image.affine_transform`) on the
TensorFlow backend; elsewhere it is `bilinear_affine` below, four gathers written in keras.ops:
Keras's JAX affine_transform interpolates in 3-D (8 taps, channel axis included) through
`map_coordinates` and measured ~10x slower on CPU (bench/augment.py). Both agree to float
rounding (tests/test_model_augment.py). The layer is jit-compatible on JAX.
It works on the single gray channel in pixel units, before VGG16 preprocessing: a third of the
work of resampling three identical channels, and the area uncovered by a transform is filled with
black, like the padding `cxr prepare` adds. `bench/augment.py` times it against the stock stack.
"""
from __future__ import annotations

import math

import keras
from keras import ops

# Maximum of each transform at aug_strength = 1 (values at strength s are s times these).
AUG_MAX = {
    "rotation_deg": 15.0,  # radiographs are taken upright; +-15 degrees covers patient tilt
    "translation": 0.10,   # fraction of width/height; positioning varies by a few centimetres
    "shear": 0.15,         # x += 0.15*y at most (~8.5 degrees); mimics oblique projection
    "zoom": 0.15,          # sampling-grid scale 0.85..1.15; patient size and film distance vary
    "contrast": 0.20,      # per-image contrast factor 0.8..1.2; exposure and processing vary
    "brightness": 0.20,    # shift of +-20% of full scale (51 grey levels)
}
PIXEL_MAX = 255.0


def augmentation_layer(strength: float, hflip: bool = False, seed: int | None = None,
                       name: str = "augment") -> "XrayAugment":
    """The augmentation layer for one `aug_strength`: each AUG_MAX entry scaled by `strength`."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"aug_strength must be in [0, 1], got {strength}")
    ranges = {key: strength * value for key, value in AUG_MAX.items()}
    return XrayAugment(**ranges, hflip=hflip, seed=seed, name=name)


@keras.saving.register_keras_serializable(package="cxr_model")
class XrayAugment(keras.layers.Layer):
    """Random affine (rotation, shift, shear, zoom, optional flip) + contrast/brightness.

    Input: gray images [B, H, W, C] in [0, 255] (any dtype; cast to the compute dtype).
    Output: same shape, float, clipped to [0, 255]. Identity (a cast) unless `training=True`.
    """

    def __init__(self, rotation_deg=0.0, translation=0.0, shear=0.0, zoom=0.0, contrast=0.0,
                 brightness=0.0, hflip=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rotation_deg = float(rotation_deg)
        self.translation = float(translation)
        self.shear = float(shear)
        self.zoom = float(zoom)
        self.contrast = float(contrast)
        self.brightness = float(brightness)
        self.hflip = bool(hflip)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # TensorFlow's projective-transform kernel is not XLA-compilable; JAX's resampling is.
        self.supports_jit = keras.backend.backend() != "tensorflow"

    @property
    def _geometric(self) -> bool:
        return any((self.rotation_deg, self.translation, self.shear, self.zoom, self.hflip))

    @property
    def _photometric(self) -> bool:
        return any((self.contrast, self.brightness))

    def call(self, images, training=None):
        images = ops.cast(images, self.compute_dtype)
        if not training or not (self._geometric or self._photometric):
            return images
        x = ops.cast(images, "float32")  # sampling coordinates need float32 even under bf16
        batch = ops.shape(x)[0]
        if self._geometric:
            x = self._resample(x, batch)
        if self._photometric:
            x = self._adjust_intensity(x, batch)
        return ops.cast(ops.clip(x, 0.0, PIXEL_MAX), self.compute_dtype)

    def _uniform(self, batch, low, high):
        return keras.random.uniform((batch,), low, high, dtype="float32", seed=self.seed_generator)

    def _resample(self, x, batch):
        height, width = x.shape[1], x.shape[2]
        transform = self._affine_rows(batch, height, width)
        if keras.backend.backend() == "tensorflow":
            # Constant 0 fill: uncovered area becomes black, like the padding of `prepare`.
            return ops.image.affine_transform(x, transform, interpolation="bilinear",
                                              fill_mode="constant", fill_value=0)
        return bilinear_affine(x, transform)

    def _affine_rows(self, batch, height, width):
        """Rows [a0 a1 a2 b0 b1 b2 0 0] mapping each OUTPUT pixel (x, y) to the input point it samples.

        Around the image centre c: p_in = R(theta) @ Shear(k) @ diag(z * f, z) @ (p_out - c) + c + t,
        so one matrix carries all five transforms and the image is interpolated once.
        """
        theta = self._uniform(batch, -1.0, 1.0) * (self.rotation_deg * math.pi / 180.0)
        k = self._uniform(batch, -self.shear, self.shear)
        z = self._uniform(batch, 1.0 - self.zoom, 1.0 + self.zoom)
        tx = self._uniform(batch, -self.translation, self.translation) * width
        ty = self._uniform(batch, -self.translation, self.translation) * height
        flip = self._flip_signs(batch)
        cos, sin = ops.cos(theta), ops.sin(theta)
        a0, a1 = cos * z * flip, z * (cos * k - sin)
        b0, b1 = sin * z * flip, z * (sin * k + cos)
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        a2 = cx - a0 * cx - a1 * cy + tx
        b2 = cy - b0 * cx - b1 * cy + ty
        zeros = ops.zeros_like(a0)
        return ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)

    def _flip_signs(self, batch):
        if not self.hflip:
            return ops.ones((batch,), dtype="float32")
        return ops.where(self._uniform(batch, 0.0, 1.0) < 0.5, -1.0, 1.0)

    def _adjust_intensity(self, x, batch):
        contrast = self._uniform(batch, 1.0 - self.contrast, 1.0 + self.contrast)
        shift = self._uniform(batch, -self.brightness, self.brightness) * PIXEL_MAX
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        contrast = ops.reshape(contrast, (-1, 1, 1, 1))
        shift = ops.reshape(shift, (-1, 1, 1, 1))
        return (x - mean) * contrast + mean + shift

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rotation_deg": self.rotation_deg,
                "translation": self.translation, "shear": self.shear, "zoom": self.zoom,
                "contrast": self.contrast, "brightness": self.brightness, "hflip": self.hflip,
                "seed": self.seed}


def bilinear_affine(images, transform):
    """`ops.image.affine_transform(images, transform)` (bilinear, constant 0 fill), in 2-D gathers.

    images [B, H, W, C] float; transform [B, 8] rows mapping output (x, y) to input points. Each
    output pixel is the weighted sum of its four neighbours at the input point; neighbours outside
    the image count as 0.
    """
    batch = ops.shape(images)[0]
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    ys, xs = ops.meshgrid(ops.arange(height, dtype="float32"), ops.arange(width, dtype="float32"),
                          indexing="ij")
    a0, a1, a2, b0, b1, b2 = (ops.reshape(transform[:, i], (-1, 1, 1)) for i in range(6))
    x_in = a0 * xs + a1 * ys + a2
    y_in = b0 * xs + b1 * ys + b2
    x0, y0 = ops.floor(x_in), ops.floor(y_in)
    fx, fy = x_in - x0, y_in - y0
    flat = ops.reshape(images, (batch, height * width, channels))

    def tap(y, x, weight):
        inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
        index = ops.cast(ops.clip(y, 0, height - 1) * width + ops.clip(x, 0, width - 1), "int32")
        values = ops.take_along_axis(flat, ops.reshape(index, (batch, height * width, 1)), axis=1)
        weight = ops.where(inside, weight, 0.0)
        return ops.reshape(values, (batch, height, width, channels)) * ops.expand_dims(weight, -1)

    return (tap(y0, x0, (1 - fx) * (1 - fy)) + tap(y0, x0 + 1, fx * (1 - fy))
            + tap(y0 + 1, x0, (1 - fx) * fy) + tap(y0 + 1, x0 + 1, fx * fy))
