"""Training data in memory and the input pipeline that feeds `fit`.

    data = Data.from_prepared("runs/prepared")            # train + val arrays, class weights
    data = Data.from_prepared("s3://bucket/prepared")     # or any pyarrow.fs URI (gs://, file://)
    stream = BatchStream(data.x_train, data.y_train, batch_size=64, seed=0,
                         class_weight=data.class_weight)
    for x, y_onehot, weight in stream.epoch(0): ...        # one epoch, every sample once

Why this shape: the whole data set at 224 px is ~300 MB of uint8, so it lives in memory (in a
search, as read-only views onto Ray's object store) and batches are plain numpy gathers: one
fancy-index per batch, no per-sample Python, no decoding. The order of epoch e is a pure function
of (seed, e), so two runs with one seed see identical batches, and a head trained on cached
features sees the same batches as the end-to-end model. A background thread builds the next
batches while the accelerator works. It is backend-agnostic (numpy in, numpy out).

`tfrecord_dataset` is the tf.data path for TFRecord shards (TensorFlow backend only), for users
who prepared TFRecords and want TensorFlow's streaming reader; `bench/input_pipeline.py` times
BatchStream.
"""
from __future__ import annotations

import fnmatch
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_datasets.errors import CxrError
from cxr_datasets.storage import Location, list_files

NUM_CLASSES = 2


@dataclass
class Data:
    """Train and validation arrays (uint8 [N, S, S, 1], int labels) and the class weights.

    The arrays are only read, never written: they may be views onto shared memory.
    `class_weight` defaults to n / (2 * n_class) on y_train (the manifest's formula).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_weight: dict[int, float] | None = None
    source: Path | str | None = None  # the prepared folder (or its URI), when loaded from one
    # TFRecord shards of the train split: fit streams them with tf.data (TensorFlow backend)
    # instead of batching x_train, unless the feature cache applies.
    train_tfrecords: tuple[str, ...] | None = None

    def __post_init__(self):
        self.x_train, self.y_train = _checked(self.x_train, self.y_train, "train")
        self.x_val, self.y_val = _checked(self.x_val, self.y_val, "val")
        if self.x_train.shape[1:] != self.x_val.shape[1:]:
            raise ValueError(f"train images {self.x_train.shape[1:]} and val images "
                             f"{self.x_val.shape[1:]} differ in size")
        if self.class_weight is None:
            self.class_weight = balanced_class_weight(self.y_train)
        self.class_weight = {int(k): float(v) for k, v in self.class_weight.items()}

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[1])

    @classmethod
    def from_prepared(cls, prepared_dir: str | Path, verify: bool = True,
                      stream_tfrecords: bool = False) -> "Data":
        """Train and val splits of a `cxr prepare` output, class weights from its manifest.

        prepared_dir: a local folder or a pyarrow.fs URI (s3://bucket/prepared, file:///data/p).
        stream_tfrecords: train from the split's TFRecord shards with tf.data (TensorFlow
        backend; the shards must exist) rather than from the in-memory array.
        """
        import cxr_datasets

        prepared = Location.of(prepared_dir)  # a URI's file system is resolved once
        x_train, y_train, _ = cxr_datasets.load(prepared, "train", verify=verify)
        x_val, y_val, _ = cxr_datasets.load(prepared, "val", verify=verify)
        weights = cxr_datasets.read_manifest(prepared).get("class_weights")
        shards = tuple(tfrecord_files(prepared, "train")) if stream_tfrecords else None
        return cls(x_train, y_train, x_val, y_val, class_weight=weights,
                   source=prepared.local or prepared.uri, train_tfrecords=shards)


def balanced_class_weight(labels: np.ndarray) -> dict[int, float]:
    """n / (2 * n_class): each class contributes equally to the loss (absent classes get 1)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_CLASSES)
    n = counts.sum()
    return {c: (float(n / (NUM_CLASSES * counts[c])) if counts[c] else 1.0)
            for c in range(NUM_CLASSES)}


def _checked(images, labels, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]  # [N, S, S] -> [N, S, S, 1]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1 \
            or images.shape[1] != images.shape[2]:
        raise ValueError(f"{split} images must be uint8 [N, S, S, 1], got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"{split} labels must have shape ({len(images)},), got {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{split} labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return images, labels.astype(np.int64, copy=False)


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


class BatchStream:
    """(x, y_onehot, sample_weight) batches from in-memory arrays: shuffled per epoch, prefetched.

    `x` may be images or cached features: any array indexed along axis 0. The class weights
    become per-sample weights here (Keras's `class_weight` is not supported for every input type
    and backend; a weight column is).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, class_weight: dict[int, float] | None = None,
                 prefetch: int = 4):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"need as many labels as samples (> 0), got {len(x)} and {len(y)}")
        self.x, self.y = x, np.asarray(y, dtype=np.int64)
        self.batch_size, self.seed, self.shuffle, self.prefetch = batch_size, seed, shuffle, prefetch
        weights = class_weight or {c: 1.0 for c in range(NUM_CLASSES)}
        self._weight_of = np.array([weights[c] for c in range(NUM_CLASSES)], dtype=np.float32)
        self._onehot = one_hot(self.y)  # precomputed once: batches only gather
        self._stop = threading.Event()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)  # the last batch may be smaller

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices of one epoch: a permutation fixed by (seed, epoch)."""
        if not self.shuffle:
            return np.arange(len(self.x))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.x))

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The batches of one epoch, in order, built in the calling thread."""
        order = self.order(epoch)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self._onehot[idx], self._weight_of[self.y[idx]]

    def __iter__(self):
        """Endless batches, epoch after epoch, built ahead by one background thread."""
        self._stop.clear()
        batches: queue.Queue = queue.Queue(maxsize=self.prefetch)
        worker = threading.Thread(target=self._fill, args=(batches,), daemon=True,
                                  name="cxr-batch-stream")
        worker.start()
        try:
            while True:
                item = batches.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def _fill(self, batches: queue.Queue) -> None:
        epoch = 0
        try:
            while not self._stop.is_set():
                for batch in self.epoch(epoch):
                    if not self._put(batches, batch):
                        return
                epoch += 1
        except BaseException as exc:  # hand the error to the consumer instead of hanging it
            self._put(batches, exc)

    def _put(self, batches: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """Stop the prefetch thread (fit calls this when training ends, early or not)."""
        self._stop.set()


def tfrecord_files(prepared_dir, split: str) -> list[str]:
    """The TFRecord shards `cxr prepare --format tfrecord|both` wrote for one split: paths, or
    URIs for a URI folder (tf.data reads file:// and gs://; s3:// needs tensorflow-io)."""


    folder = Location.of(prepared_dir).child(split)
    found = list_files(folder) if folder.kind() == "dir" else []
    names = [rel for rel, _size, is_dir in found
             if not is_dir and "/" not in rel and fnmatch.fnmatch(rel, "part-*.tfrecord")]
    if not names:
        raise CxrError(f"no TFRecord shards in {folder} (prepare with --format tfrecord or both)")
    return [str(folder.child(name)) for name in names]


def tfrecord_dataset(files: list[str], image_size: int, batch_size: int, *, seed: int = 0,
                     shuffle: bool = True, class_weight: dict[int, float] | None = None,
                     shuffle_buffer: int = 10_000):
    """tf.data pipeline over TFRecord shards -> (uint8 [B, S, S, 1], one-hot, sample weight).

    Records are tf.train.Example with PNG bytes 'image', int64 'label', bytes 'patient_id'
    (datasets' writer). One pass over the shards; re-iterate (or .repeat()) for more epochs:
    the shuffle order changes on every iteration. TensorFlow backend only.
    """
    import tensorflow as tf

    weights = class_weight or {c: 1.0 for c in range(NUM_CLASSES)}
    weight_of = tf.constant([weights[c] for c in range(NUM_CLASSES)], tf.float32)
    from cxr_datasets.shards import tfrecord_feature_spec

    # Only the two features training needs, as datasets' writer declares them.
    spec = {k: v for k, v in tfrecord_feature_spec().items() if k in ("image", "label")}

    def decode(record):
        example = tf.io.parse_single_example(record, spec)
        image = tf.io.decode_png(example["image"], channels=1)
        image = tf.ensure_shape(image, (image_size, image_size, 1))
        label = example["label"]
        return image, tf.one_hot(label, NUM_CLASSES), tf.gather(weight_of, label)

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
