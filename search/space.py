"""The search space as data, the metric it optimises, and the mapping from a sampled point to a
`TrainConfig`.

The space is a plain dict (below), so a sweep's space can be printed, saved beside its results
and overridden with `--space FILE` (YAML or JSON) without touching code:

    # space.yaml: narrow the learning rate, fix the pooling, keep the rest as default
    lr: {low: 1.0e-4, high: 3.0e-3, log: true}
    head_pooling: avg

Each entry is one of
    {low: L, high: H[, log: true]}   a number range (ints stay ints when both ends are ints)
    {choices: [a, b, ...]}           a categorical choice
    a constant                       fixed for every trial (for `head_units`: a list of widths)

Optuna samples it through a define-by-run function (`SpaceSampler`) because the head has a
variable number of layers: `head_layers` is drawn first, then one width per layer
(`head_units_1` ... `head_units_N`), so TPE learns each width only from trials that have that
layer. Likewise `aug_strength` is drawn only when `augment` is true: "no augmentation" must be a
real outcome, not a measure-zero point of a continuous range, because frozen-base trials without
augmentation train on cached VGG16 features and cost ~1/100 of the others.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# The ONE place the optimised metric is named. The reported value is the best validation AUC so far
# in the trial (see search/trainable.py for why best-so-far rather than the last epoch's).
METRIC = "val_auc"
MODE = "max"


DEFAULT_SPACE: dict[str, Any] = {
    # 1-3 dense layers: VGG16's 512-channel features rarely need more for a two-class head.
    "head_layers": {"low": 1, "high": 3},
    # widths per layer, log scale: 64 vs 128 matters as much as 512 vs 1024.
    "head_units": {"low": 64, "high": 1024, "log": True},
    "dropout": {"low": 0.0, "high": 0.7},
    # Adam: 1e-2 diverges with a trainable base, 1e-5 barely moves a fresh head; log scale between.
    "lr": {"low": 1e-5, "high": 1e-2, "log": True},
    # augment off -> cacheable features (frozen base); on -> strength sampled in (0, 1].
    "augment": {"choices": [False, True]},
    "aug_strength": {"low": 0.05, "high": 1.0},
    # VGG16 blocks to fine-tune from the top; 0 = frozen base (feature cache applies).
    "trainable_blocks": {"choices": [0, 1, 2]},
    "batch_size": {"choices": [16, 32, 64]},
    "head_pooling": {"choices": ["flatten", "avg"]},
}

MAX_HEAD_LAYERS = 3


class SpaceError(ValueError):
    """A space file is malformed; the message is one line naming the key."""


def load_space(path: str | Path | None) -> dict[str, Any]:
    """The default space, with the entries of a YAML/JSON file (if given) replacing defaults."""
    space = copy.deepcopy(DEFAULT_SPACE)
    if path is None:
        return space
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"space file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        overrides = json.loads(text)
    else:
        import yaml

        overrides = yaml.safe_load(text)
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise SpaceError(f"{path}: expected a mapping of parameter -> range/choices/constant")
    space.update(overrides)
    validate_space(space, source=str(path))
    return space


def validate_space(space: dict[str, Any], source: str = "space") -> None:
    """Raise SpaceError for unknown keys or malformed entries (before any trial starts)."""
    unknown = sorted(set(space) - set(DEFAULT_SPACE))
    if unknown:
        raise SpaceError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_SPACE)}")
    for name, spec in space.items():
        _validate_entry(name, spec, source)
    layers = space["head_layers"]
    if isinstance(layers, dict) and "low" in layers and layers["high"] > MAX_HEAD_LAYERS:
        raise SpaceError(f"{source}: head_layers: at most {MAX_HEAD_LAYERS} layers")


def _validate_entry(name: str, spec: Any, source: str) -> None:
    where = f"{source}: {name}"
    if isinstance(spec, dict):
        keys = set(spec)
        if keys == {"choices"}:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise SpaceError(f"{where}: choices must be a non-empty list")
            for value in spec["choices"]:
                _check_value(name, value, where)
            return
        if keys in ({"low", "high"}, {"low", "high", "log"}):
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise SpaceError(f"{where}: low and high must be numbers")
            if not low < high:
                raise SpaceError(f"{where}: low must be below high")
            if spec.get("log") and low <= 0:
                raise SpaceError(f"{where}: a log range needs low > 0")
            _check_value(name, low, where)
            _check_value(name, high, where)
            return
        raise SpaceError(f"{where}: expected {{low, high[, log]}} or {{choices}}, got keys {sorted(keys)}")
    if name == "head_units" and isinstance(spec, list):
        if not 1 <= len(spec) <= MAX_HEAD_LAYERS:
            raise SpaceError(f"{where}: a fixed head has 1-{MAX_HEAD_LAYERS} layers")
        for value in spec:
            _check_value(name, value, where)
        return
    _check_value(name, spec, where)


def _check_value(name: str, value: Any, where: str) -> None:
    """Range checks that would otherwise fail inside a trial, minutes later."""
    from cxr_model.config import HEAD_POOLINGS, VGG16_BLOCKS  # light: no keras import

    ok = {
        "head_layers": lambda v: isinstance(v, int) and 1 <= v <= MAX_HEAD_LAYERS,
        "head_units": lambda v: isinstance(v, int) and v >= 1,
        "dropout": lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
        "lr": lambda v: isinstance(v, (int, float)) and v > 0,
        "augment": lambda v: isinstance(v, bool),
        "aug_strength": lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
        "trainable_blocks": lambda v: isinstance(v, int) and 0 <= v <= VGG16_BLOCKS,
        "batch_size": lambda v: isinstance(v, int) and v >= 1,
        "head_pooling": lambda v: v in HEAD_POOLINGS,
    }[name]
    if isinstance(value, bool) and name != "augment" or not ok(value):
        raise SpaceError(f"{where}: invalid value {value!r}")


class SpaceSampler:
    """Optuna define-by-run function for a space dict (a class, so Tune can pickle the searcher).

    Returns the constants; Ray's OptunaSearch merges them with the suggested values, so a trial's
    config is the flat dict of everything `to_train_config` needs.
    """

    def __init__(self, space: dict[str, Any]):
        validate_space(space)
        self.space = copy.deepcopy(space)

    def __call__(self, trial) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        layers = self._draw(trial, "head_layers", constants)
        units = self.space["head_units"]
        if isinstance(units, list):
            constants["head_units"] = list(units)  # a fixed head; head_layers is then ignored
        else:
            for i in range(1, layers + 1):
                self._draw(trial, f"head_units_{i}", constants, spec=units)
        for name in ("dropout", "lr", "trainable_blocks", "batch_size", "head_pooling"):
            self._draw(trial, name, constants)
        if self._draw(trial, "augment", constants):
            self._draw(trial, "aug_strength", constants)
        return constants

    def _draw(self, trial, name: str, constants: dict, spec: Any = None) -> Any:
        spec = self.space[name] if spec is None else spec
        if not isinstance(spec, dict):
            constants[name] = spec
            return spec
        if "choices" in spec:
            return trial.suggest_categorical(name, spec["choices"])
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if isinstance(low, int) and isinstance(high, int):
            return trial.suggest_int(name, low, high, log=log)
        return trial.suggest_float(name, float(low), float(high), log=log)


def head_units_of(params: dict[str, Any]) -> tuple[int, ...]:
    """The head's widths from a trial config (sampled per layer, or a fixed list)."""
    if "head_units" in params:
        return tuple(int(u) for u in params["head_units"])
    layers = int(params["head_layers"])
    return tuple(int(params[f"head_units_{i}"]) for i in range(1, layers + 1))


def aug_strength_of(params: dict[str, Any]) -> float:
    return float(params.get("aug_strength", 0.0)) if params.get("augment", True) else 0.0


def to_train_config(params: dict[str, Any], *, image_size: int, weights: str | None,
                    epochs: int, seed: int, patience: int, use_feature_cache: bool = True):
    """A trial config -> the `TrainConfig` that `cxr_model.fit` trains (imports cxr_model lazily)."""
    from cxr_model import ModelConfig, TrainConfig

    model = ModelConfig(
        image_size=image_size,
        weights=weights,
        trainable_blocks=int(params["trainable_blocks"]),
        head_pooling=str(params["head_pooling"]),
        head_units=head_units_of(params),
        dropout=float(params["dropout"]),
        aug_strength=aug_strength_of(params),
    )
    return TrainConfig(model=model, lr=float(params["lr"]), batch_size=int(params["batch_size"]),
                       epochs=epochs, seed=seed, patience=patience, use_feature_cache=use_feature_cache)


def describe(space: dict[str, Any]) -> str:
    """One line per parameter, for the report and the CLI."""
    lines = []
    for name, spec in space.items():
        if isinstance(spec, dict) and "choices" in spec:
            text = "one of " + ", ".join(map(str, spec["choices"]))
        elif isinstance(spec, dict):
            text = f"{spec['low']:g} .. {spec['high']:g}" + (" (log)" if spec.get("log") else "")
        else:
            text = f"fixed {spec}"
        lines.append(f"{name}: {text}")
    return "\n".join(lines)
