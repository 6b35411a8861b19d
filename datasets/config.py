"""Names and defaults shared by the whole data pipeline: class labels, split names and `PrepareConfig`.

`PrepareConfig` is the one place where `cxr prepare`'s options and their defaults live; the CLI,
`cxr_datasets.prepare()` and the manifest (`options`) all read it, so they cannot drift apart.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import ConfigError

# Label i is CLASS_NAMES[i]. PNEUMONIA is the positive class (label 1) everywhere downstream.
CLASS_NAMES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".dcm")
RESIZE_MODES: tuple[str, ...] = ("pad", "crop", "squash")
SPLIT_MODES: tuple[str, ...] = ("official", "random")
FORMATS: tuple[str, ...] = ("parquet", "tfrecord", "both")
LABEL_FORMATS: tuple[str, ...] = ("csv", "rsna", "nih", "chexpert")  # datasets/labels.py
NEGATIVES: tuple[str, ...] = ("default", "all")
UNCERTAIN: tuple[str, ...] = ("ignore", "zeros", "ones")
VIEWS: tuple[str, ...] = ("frontal", "all")
SCHEMA_VERSION = 1


def label_names(labels: np.ndarray) -> np.ndarray:
    """The class name of each label (an object array of the shared CLASS_NAMES strings)."""
    return np.array(CLASS_NAMES, dtype=object)[np.asarray(labels)]


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that decides what `prepare` writes; saved verbatim as the manifest's `options`."""

    image_size: int = 224  # VGG16's native input; the real data set is ~300 MB of uint8 at this size
    resize: str = "pad"  # aspect-preserving letterbox: NORMAL images are larger and wider, so
    #                      "squash" would leak the class through the distorted anatomy
    split: str = "official"  # keep the official test split; "random" pools everything first
    val_fraction: float = 0.1  # share of train's *patients* (per class) carved out for validation
    test_fraction: float = 0.15  # only for sources without split folders (or --split random)
    seed: int = 0  # seeds the patient shuffles of the val/test carve-out
    rows_per_shard: int | None = None  # the most rows a shard holds, one task of pass 2. None:
    #   1024 (~50 MB at 224 px), fewer below ~65,000 images so that a small archive still makes
    #   >= 64 shards for many CPUs (down to 128 rows), fewer above 256 px (decode.shard_size)
    format: str = "parquet"  # "parquet", "tfrecord" or "both"
    max_pixels: int = 64_000_000  # decompression-bomb limit; a 43x43 cm detector at 0.1 mm is ~18 MP
    min_size: int = 64  # shorter side in pixels below which an image carries no usable detail
    num_cpus: int | None = None  # CPUs for a Ray instance we start ourselves; None = all of them
    files_per_task: int = 4096  # files a task of the first pass reads and hashes (~25 us each):
    #                            amortises a task's ~10 ms, still balances load (the second pass
    #                            runs a task per shard)
    labels: str | None = None  # a label file (labels.py) instead of NORMAL/PNEUMONIA folders
    labels_format: str | None = None  # None: detected from the label file's header
    negatives: str = "default"  # "all": an archive's other negatives (not normal) count as NORMAL
    uncertain: str = "ignore"  # CheXpert's uncertain Pneumonia (-1.0): ignore, zeros or ones
    views: str = "frontal"  # CheXpert: frontal views only, or all
    follow_links: bool = False  # read symbolic links to files outside SOURCE (rejected by default)

    def __post_init__(self):
        _check_choice("resize", self.resize, RESIZE_MODES)
        _check_choice("split", self.split, SPLIT_MODES)
        _check_choice("format", self.format, FORMATS)
        if self.labels_format is not None:
            _check_choice("labels format", self.labels_format, LABEL_FORMATS)
        _check_choice("negatives", self.negatives, NEGATIVES)
        _check_choice("uncertain", self.uncertain, UNCERTAIN)
        _check_choice("views", self.views, VIEWS)
        if not 16 <= self.image_size <= 4096:
            raise ConfigError(f"image size must be between 16 and 4096 pixels, got {self.image_size}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise ConfigError(f"{name.replace('_', ' ')} must be between 0 and 0.5, got {value}")
        for name in ("rows_per_shard", "max_pixels", "min_size", "files_per_task"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"num cpus must be at least 1, got {self.num_cpus}")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
