"""Cache of frozen VGG16 features, shared by the trials of a search.

    cache = FeatureCache("/tmp/cxr-features")      # or FeatureCache() for memory only
    f_train = cache.features(cfg.model, data.x_train, seed=0)
    fit(train_cfg, data, feature_cache=cache)      # how fit uses it

When `trainable_blocks == 0` and no augmentation is active (`ModelConfig.base_is_fixed`), raw
image -> VGG16 feature maps is a fixed function, the same for every trial of a sweep: compute it
once and train only the head, ~100x cheaper per epoch. The key is everything that determines the
features:
- the base's weights: "imagenet", the sha256 of a local weights file, or for weights=None the
  init seed (build_model seeds the random base from it, so random features are reproducible too);
- image size, Keras backend and dtype policy (bf16 features are not float32 features);
- the images: sha256 of all their bytes plus shape (~0.15 s for the full 260 MB train split, so
  the key is exact, not a sample).
Features live in a dict in this process and, with `cache_dir`, in `<cache_dir>/<key>.npy`, written
once under a file lock: several trial processes on one node wait for the first to compute, then
memory-map the same file (one copy in the page cache, not one per trial). Use a node-local
directory; the files are 100 KB per image at 224 px with "flatten"-sized maps (7x7x512 float32).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from pathlib import Path

import keras
import numpy as np

from .config import ModelConfig
from .model import VGG16_NOTOP_MD5, build_base

FEATURE_BATCH = 64


class FeatureCache:
    """Frozen-base features per (weights identity, image size, images), in memory and on disk."""

    def __init__(self, cache_dir: str | Path | None = None, batch_size: int = FEATURE_BATCH):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self._memory: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # trials may share one cache from several threads
        self.computed = 0  # how many feature arrays this object computed (tests, logs)

    def __len__(self) -> int:
        return len(self._memory)

    def features(self, cfg: ModelConfig, images: np.ndarray, *, seed: int = 0,
                 extractor: keras.Model | None = None) -> np.ndarray:
        """VGG16 feature maps float32 [N, h, w, 512] of uint8 images [N, S, S, 1].

        `extractor` (raw image -> features, e.g. `model.feature_extractor(full_model)`) is used
        on a miss; without one, `build_base(cfg, seed=seed)` is built. Either must be the
        function the key describes: the base of a model built from `cfg` and `seed`.
        """
        if not cfg.base_is_fixed:
            raise ValueError("features are only fixed with trainable_blocks=0 and no augmentation")
        key = self.key(cfg, images, seed=seed)
        with self._lock:
            if key not in self._memory:
                self._memory[key] = self._load_or_compute(key, cfg, images, seed, extractor)
            return self._memory[key]

    def key(self, cfg: ModelConfig, images: np.ndarray, *, seed: int = 0) -> str:
        parts = {
            "base": weights_identity(cfg.weights, seed),
            "image_size": cfg.image_size,
            "backend": keras.backend.backend(),
            "dtype_policy": keras.config.dtype_policy().name,
            "keras": keras.__version__,
            "images": array_fingerprint(_with_channel(images)),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def _load_or_compute(self, key, cfg, images, seed, extractor) -> np.ndarray:
        if self.cache_dir is None:
            return self._compute(cfg, images, seed, extractor)
        from filelock import FileLock

        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.cache_dir / f"{key}.npy"
        with FileLock(str(path) + ".lock"):  # the first process computes, the others wait
            if not os.path.lexists(path):
                _save_atomically(path, self._compute(cfg, images, seed, extractor))
        if not path.is_file() or path.is_symlink():
            from cxr_datasets.errors import CxrError

            raise CxrError(f"feature cache {path} is not a regular file (a link?): remove it")
        return np.load(path, mmap_mode="r")  # shared page cache across trial processes

    def _compute(self, cfg, images, seed, extractor) -> np.ndarray:
        extractor = extractor or build_base(cfg, seed=seed)
        self.computed += 1
        out = extractor.predict(_with_channel(images), batch_size=self.batch_size, verbose=0)
        return np.asarray(out, dtype=np.float32)


def weights_identity(weights: str | None, seed: int) -> str:
    """What fixes the base's weights: a name, a file's content hash, or the init seed."""
    if weights is None:
        return f"random-init:seed={seed}"
    if weights == "imagenet":
        return f"imagenet:{VGG16_NOTOP_MD5}"
    path = Path(weights).expanduser().resolve()
    stat = path.stat()
    return f"file:{_file_sha256(str(path), stat.st_size, stat.st_mtime_ns)}"


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so an overwritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def array_fingerprint(images: np.ndarray) -> str:
    """shape, dtype and sha256 of every byte of the array."""
    images = np.ascontiguousarray(images)
    digest = hashlib.sha256(images.data.cast("B")).hexdigest()
    return f"{images.dtype}{list(images.shape)}:{digest}"


def _with_channel(images: np.ndarray) -> np.ndarray:
    return images[..., None] if images.ndim == 3 else images


def _save_atomically(path: Path, array: np.ndarray) -> None:
    # A crash mid-write must not leave a truncated file that later trials would trust.
    # O_EXCL | O_NOFOLLOW: never write through a link someone placed at the temporary name.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):  # left by a crashed process with this pid: unlink removes a link, not its target
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
