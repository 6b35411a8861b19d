"""Configuration of one model and one training run: two frozen dataclasses, JSON round-trippable.

    cfg = TrainConfig(model=ModelConfig(image_size=224, head_units=(512, 128)), lr=3e-4)
    json.dumps(cfg.to_dict());  TrainConfig.from_dict(json.loads(text)) == cfg

These are what a search trial samples, what `fit` consumes and what the model card records, so
every value is checked when the object is made: a bad value fails at once with one clear line
(`ConfigError`, a `ValueError` that the `cxr` CLI prints as `cxr: error: ...`), not twenty minutes
into a sweep.

This module also names, once, the metric that every stage optimises (`METRIC`, `MODE`) and holds
`EvalConfig`, the settings of scoring a trained model (threshold choice, bootstrap intervals).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from cxr_datasets.errors import ConfigError

HEAD_POOLINGS = ("flatten", "avg")
VGG16_BLOCKS = 5
THRESHOLD_METHODS = ("youden", "sensitivity")
# The files an export writes the model as: model.keras always (cxr predict, serve and evaluate load
# it), and by default the same graph as a TensorFlow SavedModel and as ONNX. Those two come from a
# TensorFlow child process (cxr_model/export_formats.py) that costs ~20 s even for a tiny model and
# GBs for a 224 px VGG16, so `--formats keras` leaves them out where nothing needs them.
EXPORT_FORMATS = ("keras", "saved_model", "onnx")

# The metric that early stopping (train.py), the trials' reports, ASHA, Optuna, the results table
# and the choice of the best trial all optimise, named once. Keras logs the AUC of P(PNEUMONIA)
# (model.py's ClassAUC, named "auc") on the validation split as "val_" + "auc". AUC rather than
# accuracy: "always PNEUMONIA" is already 62-74% accurate on this data, and AUC does not depend on
# the decision threshold, which is chosen later, on validation.
METRIC = "val_auc"
MODE = "max"
METRIC_LABEL = "validation AUC"  # how reports and plots spell METRIC


def improves(value: float, best: float) -> bool:
    """True when `value` is better than `best` in MODE's direction; NaN never improves."""
    return value > best if MODE == "max" else value < best


WORST = -math.inf if MODE == "max" else math.inf  # the start of a best-so-far: anything improves it


@dataclass(frozen=True)
class ModelConfig:
    """The VGG16 transfer-learning model; see `cxr_model.model.build_model`."""

    # Side of the square uint8 input, the size `cxr prepare` wrote; 224 is VGG16's native size.
    image_size: int = 224
    # "imagenet" (downloaded once, file-locked) | None (random init, offline tests) | path to a
    # local .h5/.weights.h5; ImageNet features transfer well to radiographs with little data.
    weights: str | None = "imagenet"
    # How many of VGG16's 5 conv blocks to fine-tune, counted from the top; 0 keeps the base a
    # frozen feature extractor (the original notebook), which also enables the feature cache.
    trainable_blocks: int = 0
    # "flatten" keeps spatial layout (the notebook's head); "avg" is 49x smaller at 224 px.
    head_pooling: str = "flatten"
    # One Dense+ReLU+Dropout per entry; one 256-unit layer is the notebook's head.
    head_units: tuple[int, ...] = (256,)
    # Dropout after each dense layer; 0.3 regularises a ~6M-parameter head on ~5k images.
    dropout: float = 0.3
    # Scales every augmentation maximum (cxr_model.augment.AUG_MAX) at once; 0 disables it.
    aug_strength: float = 0.2
    # Off by default: the heart is on the left, so a mirrored radiograph is anatomically wrong.
    hflip: bool = False

    def __post_init__(self):
        object.__setattr__(self, "weights", normalise_weights(self.weights))
        object.__setattr__(self, "head_units", tuple(int(u) for u in self.head_units))
        _check_int(self, "image_size", low=32)  # VGG16's five 2x2 pools need >= 32 px
        _check_int(self, "trainable_blocks", low=0, high=VGG16_BLOCKS)
        if self.head_pooling not in HEAD_POOLINGS:
            raise ConfigError(f"head_pooling must be one of {HEAD_POOLINGS}, got {self.head_pooling!r}")
        if any(u < 1 for u in self.head_units):
            raise ConfigError(f"head_units must be positive integers, got {self.head_units}")
        _check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        _check_float(self, "aug_strength", low=0.0, high=1.0)
        if not isinstance(self.hflip, bool):
            raise ConfigError(f"hflip must be true or false, got {self.hflip!r}")

    @property
    def augments(self) -> bool:
        """True when the model contains an augmentation layer (it is omitted otherwise)."""
        return self.aug_strength > 0 or self.hflip

    @property
    def base_is_fixed(self) -> bool:
        """True when raw image -> VGG16 features is a fixed function: the feature cache applies."""
        return self.trainable_blocks == 0 and not self.augments

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "head_units": list(self.head_units)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        reject_unknown(cls, d)
        return cls(**{**d, "head_units": tuple(d.get("head_units", cls.head_units))})


@dataclass(frozen=True)
class TrainConfig:
    """One training run of one model; see `cxr_model.train.fit`."""

    # The architecture being trained.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Adam's step; 1e-4 is the usual safe rate for a head on frozen ImageNet features.
    lr: float = 1e-4
    # 32 fits any GPU at 224 px with fine-tuning; a frozen base can afford far more.
    batch_size: int = 32
    # Upper bound; early stopping on val_auc usually ends sooner.
    epochs: int = 10
    # Seeds weight init (heads, and the base when weights=None), shuffling, dropout, augmentation.
    seed: int = 0
    # Epochs without a val_auc improvement before stopping (best weights are restored).
    patience: int = 3
    # Train the head on cached VGG16 features when the base is fixed (same result, ~100x cheaper).
    use_feature_cache: bool = True
    # Cross-entropy against (1 - s) * one-hot + s / 2: a softer target for labels read off
    # radiographs by clinicians (some are wrong); 0 is plain cross-entropy, the notebook's loss.
    label_smoothing: float = 0.0

    def __post_init__(self):
        if isinstance(self.model, dict):  # lets from_dict and callers pass a plain dict
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model must be a ModelConfig, got {type(self.model).__name__}")
        _check_float(self, "lr", low=0.0, low_open=True, high=1.0)
        _check_int(self, "batch_size", low=1)
        _check_int(self, "epochs", low=1)
        _check_int(self, "seed", low=0)
        _check_int(self, "patience", low=1)
        if not isinstance(self.use_feature_cache, bool):
            raise ConfigError(f"use_feature_cache must be true or false, got {self.use_feature_cache!r}")
        _check_float(self, "label_smoothing", low=0.0, high=0.5, high_open=True)  # 0.5: labels erased

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        reject_unknown(cls, d)
        return cls(**{**d, "model": ModelConfig.from_dict(d.get("model", {}))})


@dataclass(frozen=True)
class EvalConfig:
    """How a trained model is scored: the decision threshold (chosen on validation) and the
    bootstrap intervals of its metrics; see `cxr_model.finalize.finalize`."""

    # Youden's J maximises sensitivity + specificity; "sensitivity" takes the best specificity
    # among thresholds that reach target_sensitivity (screening, where a missed case costs most).
    threshold_method: str = "youden"
    # Only for threshold_method="sensitivity".
    target_sensitivity: float = 0.95
    # Bootstrap resamples for the 95% intervals: 1,000 is the usual minimum for percentile
    # intervals (their ends are the 2.5% and 97.5% quantiles); fewer is for smoke runs only.
    n_boot: int = 1000

    def __post_init__(self):
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ConfigError(f"threshold_method must be one of {', '.join(THRESHOLD_METHODS)}, "
                              f"got {self.threshold_method!r}")
        _check_float(self, "target_sensitivity", low=0.0, high=1.0, low_open=True)
        _check_int(self, "n_boot", low=1)


def check_formats(formats) -> tuple[str, ...]:
    """The export formats as a tuple in EXPORT_FORMATS' order, from a tuple, list or "keras,onnx";
    ConfigError for an unknown one or a set without keras."""
    names = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    unknown = [f for f in names if f not in EXPORT_FORMATS]
    if unknown or "keras" not in names:
        raise ConfigError(f"formats must include keras and be among {', '.join(EXPORT_FORMATS)}, "
                          f"got {','.join(map(str, names)) or 'none'}")
    return tuple(f for f in EXPORT_FORMATS if f in names)


def normalise_weights(weights) -> str | None:
    """The VGG16 weights setting as the model wants it: None for no weights, else a string.

    The CLI and JSON spell "no weights" as "none", "null" or ""; a pathlib.Path becomes its string.
    """
    if isinstance(weights, str) and weights.strip().lower() in ("none", "null", ""):
        return None
    if weights is not None and not isinstance(weights, str):
        return str(weights)  # a pathlib.Path
    return weights


def _check_int(cfg, name: str, low: int | None = None, high: int | None = None) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON from other tools may write 224.0
            object.__setattr__(cfg, name, value)
        else:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be {bounds}, got {value}")


def _check_float(cfg, name: str, low: float, high: float, low_open=False, high_open=False) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be in {interval}, got {value}")
    object.__setattr__(cfg, name, float(value))


def reject_unknown(cls, d: dict[str, Any]) -> None:
    """ConfigError naming the keys of `d` that are not fields of the dataclass `cls`.

    A typo in a saved config must fail loudly, not silently fall back to a default."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
