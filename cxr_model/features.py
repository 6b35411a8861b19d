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

Subsets hit too. Features are a function of each image, not of the array it came in, so beside
every array of features the cache keeps one digest per image (`<base>-<key>.rows`, 16 bytes a
row; `<base>` is the key without the images). A request whose exact array was never seen is
answered from the arrays already cached for the same base when together they hold every one of
its images: the rows are gathered, nothing is computed. That is what cross-validation needs
(`cxr search --cv K`): fold 1's training and held-out parts are computed once, and every other
fold's parts, subsets of their union, are gathered from them, in every trial on the node.
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

from cxr_datasets.errors import CxrError

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
        self.gathered = 0  # how many requests were answered from other cached arrays' rows
        self._entries: dict[str, list[str]] = {}  # base key -> keys of its cached arrays
        self._row_index: dict[str, dict[bytes, tuple[int, int]]] = {}  # base -> image digest -> (entry, row)

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
            if key in self._memory:
                return self._memory[key]
            base = self.base_key(cfg, seed=seed)
            if self.cache_dir is None or not os.path.lexists(self.cache_dir / f"{key}.npy"):
                rows = row_digests(_with_channel(images))
                gathered = self._gather(base, rows)
                if gathered is not None:  # a subset of what is cached: nothing to compute or store
                    self.gathered += 1
                    return gathered
            else:
                rows = None
            self._memory[key] = self._load_or_compute(key, base, rows, cfg, images, seed, extractor)
            return self._memory[key]

    def key(self, cfg: ModelConfig, images: np.ndarray, *, seed: int = 0) -> str:
        return _digest({**self._base_parts(cfg, seed), "images": array_fingerprint(_with_channel(images))})

    def base_key(self, cfg: ModelConfig, *, seed: int = 0) -> str:
        """The key without the images: the function image -> features (the base and how it runs)."""
        return _digest(self._base_parts(cfg, seed))[:16]

    @staticmethod
    def _base_parts(cfg: ModelConfig, seed: int) -> dict:
        return {
            "base": weights_identity(cfg.weights, seed),
            "image_size": cfg.image_size,
            "backend": keras.backend.backend(),
            "dtype_policy": keras.config.dtype_policy().name,
            "keras": keras.__version__,
        }

    def _gather(self, base: str, rows: np.ndarray) -> np.ndarray | None:
        """The features of the images with digests `rows`, from the arrays cached for `base` (in
        memory, or on disk from other processes), or None when some image is in none of them."""
        self._scan_disk(base)
        index = self._row_index.get(base)
        if not index:
            return None
        found = []
        for r in rows:
            hit = index.get(r.tobytes())
            if hit is None:
                return None
            found.append(hit)
        entries = self._entries[base]
        first = self._memory[entries[0]]
        out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        which = np.array([f[0] for f in found], dtype=np.int64)
        at = np.array([f[1] for f in found], dtype=np.int64)
        for e in np.unique(which):
            chosen = which == e
            out[chosen] = self._memory[entries[e]][at[chosen]]
        return out

    def _remember(self, base: str, key: str, rows: np.ndarray) -> None:
        entries = self._entries.setdefault(base, [])
        if key in entries:
            return
        entries.append(key)
        index = self._row_index.setdefault(base, {})
        number = len(entries) - 1
        for i, row in enumerate(rows):
            index.setdefault(row.tobytes(), (number, i))

    def _scan_disk(self, base: str) -> None:
        """Take in the arrays other processes cached for `base` since this one last looked."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return
        for rows_path in sorted(self.cache_dir.glob(f"{base}-*.rows")):
            key = rows_path.name[len(base) + 1:-len(".rows")]
            if key in self._entries.get(base, ()):
                continue
            path = self.cache_dir / f"{key}.npy"
            if not _regular(path) or not _regular(rows_path):
                continue
            self._memory.setdefault(key, np.load(path, mmap_mode="r"))
            self._remember(base, key, np.load(rows_path))

    def _load_or_compute(self, key, base, rows, cfg, images, seed, extractor) -> np.ndarray:
        if self.cache_dir is None:
            features = self._compute(cfg, images, seed, extractor)
            self._remember(base, key, rows if rows is not None else row_digests(_with_channel(images)))
            return features
        from filelock import FileLock

        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.cache_dir / f"{key}.npy"
        rows_path = self.cache_dir / f"{base}-{key}.rows"
        with FileLock(str(path) + ".lock"):  # the first process computes, the others wait
            if not os.path.lexists(path):
                _save_atomically(path, self._compute(cfg, images, seed, extractor))
            if not os.path.lexists(rows_path):  # after the features: a .rows file names a complete array
                _save_atomically(rows_path, rows if rows is not None else row_digests(_with_channel(images)))
        if not _regular(path):
            raise CxrError(f"feature cache {path} is not a regular file (a link?): remove it")
        features = np.load(path, mmap_mode="r")  # shared page cache across trial processes
        self._memory[key] = features
        if _regular(rows_path):
            self._remember(base, key, np.load(rows_path))
        return features

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


def row_digests(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 16]: a blake2b digest of each image's bytes (what a subset's lookup matches)."""
    images = np.ascontiguousarray(images)
    out = np.empty((len(images), 16), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.frombuffer(hashlib.blake2b(image.data.cast("B"), digest_size=16).digest(), np.uint8)
    return out


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


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
