"""Augmentation alone: images/s of cxr_model's one-pass XrayAugment vs Keras's stock layer stack.

    KERAS_BACKEND=tensorflow python bench/augment.py            # 224 px, batch 64
    KERAS_BACKEND=jax python bench/augment.py --batches 5       # smoke test
    python bench/augment.py --both                              # each backend in a subprocess

Both sides apply the same maxima (aug_strength 1: 15 degrees, 10% shift, 0.15 shear, 15% zoom,
20% contrast and brightness) to [B, S, S, 1] float images in training mode. Three rows:
- `xray_augment`: our layer, compiled the way Keras compiles a model that contains it
  (jax.jit under JAX, tf.function under TensorFlow).
- `stock_as_keras_runs_it`: RandomRotation+RandomTranslation+RandomShear+RandomZoom+
  RandomContrast+RandomBrightness, compiled the way Keras runs a model containing them. They
  declare `supports_jit = False`, so under JAX a model containing them runs op by op, not jitted.
- `stock_compiled`: the same stack force-compiled, to separate kernel cost from dispatch cost.
Prints a table, then the ratio (ours / stock as Keras runs it) last. Timings on a shared machine
are noisy: compare rows of one run, not runs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per row")
    p.add_argument("--both", action="store_true", help="run under tensorflow and jax, one process each")
    return p.parse_args(argv)


def stock_stack(seed=0):
    import keras

    from cxr_model.augment import AUG_MAX

    m = AUG_MAX
    return keras.Sequential([
        keras.layers.RandomRotation(m["rotation_deg"] / 360.0, fill_mode="constant", seed=seed),
        keras.layers.RandomTranslation(m["translation"], m["translation"], fill_mode="constant", seed=seed),
        keras.layers.RandomShear(m["shear"], m["shear"], fill_mode="constant", seed=seed),
        keras.layers.RandomZoom(m["zoom"], fill_mode="constant", seed=seed),
        keras.layers.RandomContrast(m["contrast"], value_range=(0, 255), seed=seed),
        keras.layers.RandomBrightness(m["brightness"], value_range=(0, 255), seed=seed),
    ])


def compiled(layer, jit: bool):
    """A function images -> augmented images, run as Keras would run it inside `fit`."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        def step(state, x):
            y, state = layer.stateless_call([], state, x, training=True)
            return y, state

        fn = jax.jit(step) if jit else step
        state = [v.value for v in layer.non_trainable_variables]

        def run(x):
            nonlocal state
            y, state = fn(state, x)
            return y.block_until_ready()
        return run
    import tensorflow as tf

    # Keras's TF trainer always wraps the step in tf.function; jit_compile only adds XLA.
    fn = tf.function(lambda x: layer(x, training=True))
    return lambda x: fn(x).numpy()


def images_per_s(run, x, batches: int) -> float:
    run(x)  # compile / warm up
    run(x)
    start = time.perf_counter()
    for _ in range(batches):
        run(x)
    return batches * x.shape[0] / (time.perf_counter() - start)


def bench_backend(args) -> float:
    import keras
    import numpy as np

    from cxr_model.augment import augmentation_layer

    rng = np.random.default_rng(0)
    s, b = args.image_size, args.batch_size
    x = keras.ops.convert_to_tensor(rng.integers(0, 256, (b, s, s, 1)).astype("float32"))
    ours = augmentation_layer(1.0, seed=0)
    ours.build(x.shape)
    stock = stock_stack()
    stock.build(x.shape)
    stock_jits = all(layer.supports_jit for layer in stock.layers)
    backend = keras.backend.backend()
    rows = [
        ("xray_augment", images_per_s(compiled(ours, jit=ours.supports_jit), x, args.batches)),
        ("stock_as_keras_runs_it", images_per_s(compiled(stock, jit=stock_jits), x, args.batches)),
    ]
    if backend == "jax":
        rows.append(("stock_compiled", images_per_s(compiled(stock, jit=True), x, args.batches)))
    print(f"backend={backend} image_size={s} batch={b} batches={args.batches} "
          f"stock supports_jit={stock_jits}")
    for name, rate in rows:
        print(f"  {name:<24} {rate:10.0f} img/s")
    ratio = rows[0][1] / rows[1][1]
    print(f"ratio xray_augment / stock ({backend}): {ratio:.2f}")
    return ratio


def run_both(argv) -> int:
    argv = [a for a in argv if a != "--both"]
    for backend in ("tensorflow", "jax"):
        env = {**os.environ, "KERAS_BACKEND": backend}
        subprocess.run([sys.executable, __file__, *argv], env=env, check=True)
    return 0


if __name__ == "__main__":
    args = parse_args()
    if args.both:
        sys.exit(run_both(sys.argv[1:]))
    bench_backend(args)
