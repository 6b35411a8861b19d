"""Input pipeline throughput: images/s that BatchStream delivers at 224 px, pinned to one core.

    python bench/input_pipeline.py                      # 4,096 images, batch 128, 3 epochs
    python bench/input_pipeline.py --images 512 --epochs 1   # smoke test

Target: >= 10,000 img/s on one core, above the ~9,000 img/s a frozen VGG16 consumes on an H100
(Keras on JAX, batch 128), so the loader never starves a GPU. Measures the consumer's view of the
prefetching iterator (what `fit` sees) and, for reference, the same batches built inline.
Each batch is a seeded-shuffle gather of uint8 images plus one-hot labels and class weights.
Backend-independent (numpy only); prints the ratio to the target last.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # importing cxr_model loads Keras

TARGET = 10_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--all-cores", action="store_true", help="do not pin to one core")
    return p.parse_args(argv)


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity on this OS)"


def rate(batches, count: int) -> float:
    start = time.perf_counter()
    n = 0
    for xb, yb, wb in itertools.islice(batches, count):
        n += len(xb)
    return n / (time.perf_counter() - start)


def main(argv=None) -> float:
    args = parse_args(argv)
    where = "all cores" if args.all_cores else pin_to_one_core()
    from cxr_model.data import BatchStream

    rng = np.random.default_rng(0)
    s = args.image_size
    x = rng.integers(0, 256, (args.images, s, s, 1), dtype=np.uint8)
    y = rng.integers(0, 2, args.images)
    stream = BatchStream(x, y, args.batch_size, seed=0, class_weight={0: 1.9, 1: 0.7})
    steps = stream.steps_per_epoch * args.epochs
    inline = rate(itertools.chain.from_iterable(stream.epoch(e) for e in range(args.epochs)), steps)
    it = iter(stream)
    next(it)  # start the prefetch thread
    prefetched = rate(it, steps - 1)
    it.close()
    print(f"images={args.images} size={s} batch={args.batch_size} epochs={args.epochs} ({where}; "
          f"{x.nbytes / 1e6:.0f} MB in memory)")
    print(f"  inline batches      {inline:10.0f} img/s")
    print(f"  prefetched (fit's)  {prefetched:10.0f} img/s")
    ratio = prefetched / TARGET
    print(f"ratio prefetched / {TARGET:,} img/s target: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
