"""The search space: each hyperparameter declared once, with the `TrainConfig` field it sets.

`HYPERPARAMETERS` below is the only place a hyperparameter is declared. Everything else is
derived from it: the default space, what a space file may contain, the validation of every value
(by building a `TrainConfig` with it), the order Optuna samples in, the mapping of a sampled point
to a `TrainConfig`, the columns of the results table and the report's plots. Adding one means:
a field in `cxr_model/config.py`, the code that uses it, one entry here (see the README, "Adding a
hyperparameter").

A space is a plain dict, name -> entry, so a sweep's space can be printed, saved beside its
results and overridden with `--space FILE` (YAML or JSON) without touching code:

    # space.yaml: narrow the learning rate, fix the pooling, keep the rest as default
    lr: {low: 1.0e-4, high: 3.0e-3, log: true}
    head_pooling: avg

Each entry is one of
    {low: L, high: H[, log: true]}   a number range (ints stay ints when both ends are ints)
    {choices: [a, b, ...]}           a categorical choice
    a constant                       fixed for every trial (for `head_units`: a list of widths)

Optuna samples it through a define-by-run function (`SpaceSampler`), in declaration order,
because the head has a variable number of layers: `head_layers` is drawn first, then one width
per layer (`head_units_1` ... `head_units_N`), so TPE learns each width only from trials that have
that layer. Likewise `aug_strength` is drawn only when `augment` is true: "no augmentation" must
be a real outcome, not a measure-zero point of a continuous range, because frozen-base trials
without augmentation train on cached VGG16 features and cost ~1/100 of the others.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cxr_datasets.errors import ConfigError
from cxr_model.config import METRIC, TrainConfig  # METRIC, MODE: re-exported for search/
from cxr_model.config import MODE as MODE

# What trials report besides METRIC (their best so far, see search/trial_reporter.py): the value
# of the epoch itself, which the results table keeps per epoch as METRIC_e1, METRIC_e2, ...
EPOCH_METRIC = f"epoch_{METRIC}"


@dataclass(frozen=True)
class Hyperparameter:
    """One searched setting.

    target:    the `TrainConfig` field it sets, dotted for the model's ("lr", "model.dropout");
               None for a hyperparameter that only shapes the sampling of others
    default:   its entry in the default space: a range, a choice or a constant
    per_layer: drawn once per layer, as NAME_1 ... NAME_N with N the value of this (count)
               hyperparameter; the target gets the tuple
    only_if:   drawn only when this (boolean) hyperparameter is true; else the target gets `otherwise`
    """

    target: str | None
    default: Any
    per_layer: str | None = None
    only_if: str | None = None
    otherwise: Any = None


MAX_HEAD_LAYERS = 3  # a count hyperparameter's limit: TPE models each layer's width separately

# Declaration order is sampling order: a hyperparameter named by `per_layer` or `only_if` comes
# before the ones it governs. (The order also fixes which random numbers TPE's seeded start-up
# trials draw, so a reordering changes which trials a seeded sweep runs.)
HYPERPARAMETERS: dict[str, Hyperparameter] = {
    # 1-3 dense layers: VGG16's 512-channel features rarely need more for a two-class head.
    "head_layers": Hyperparameter(None, {"low": 1, "high": MAX_HEAD_LAYERS}),
    # widths per layer, log scale: 64 vs 128 matters as much as 512 vs 1024.
    "head_units": Hyperparameter("model.head_units", {"low": 64, "high": 1024, "log": True},
                                 per_layer="head_layers"),
    "dropout": Hyperparameter("model.dropout", {"low": 0.0, "high": 0.7}),
    # Adam: 1e-2 diverges with a trainable base, 1e-5 barely moves a fresh head; log scale between.
    "lr": Hyperparameter("lr", {"low": 1e-5, "high": 1e-2, "log": True}),
    # VGG16 blocks to fine-tune from the top; 0 = frozen base (feature cache applies).
    "trainable_blocks": Hyperparameter("model.trainable_blocks", {"choices": [0, 1, 2]}),
    "batch_size": Hyperparameter("batch_size", {"choices": [16, 32, 64]}),
    "head_pooling": Hyperparameter("model.head_pooling", {"choices": ["flatten", "avg"]}),
    # augment off -> cacheable features (frozen base); on -> strength sampled in (0, 1].
    "augment": Hyperparameter(None, {"choices": [False, True]}),
    "aug_strength": Hyperparameter("model.aug_strength", {"low": 0.05, "high": 1.0},
                                   only_if="augment", otherwise=0.0),
    # 0-0.2: beyond that the targets of the two classes approach each other (0.5 erases them).
    "label_smoothing": Hyperparameter("label_smoothing", {"low": 0.0, "high": 0.2}),
}



def default_space() -> dict[str, Any]:
    """The default space: every hyperparameter's `default` entry (a fresh copy)."""
    return {name: copy.deepcopy(hp.default) for name, hp in HYPERPARAMETERS.items()}


def _counts() -> set[str]:
    """Hyperparameters that count layers for a per-layer one (no config field receives them)."""
    return {hp.per_layer for hp in HYPERPARAMETERS.values() if hp.per_layer}


def _switches() -> set[str]:
    """Hyperparameters that switch another on or off (no config field receives them)."""
    return {hp.only_if for hp in HYPERPARAMETERS.values() if hp.only_if}


class SpaceError(ConfigError):
    """A space is malformed; the message is one line naming the key."""


def load_space(path: str | Path | None) -> dict[str, Any]:
    """The default space, with the entries of a YAML/JSON file (if given) replacing defaults."""
    if path is None:
        return resolve_space({})
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"space file not found: {path}")
    text = path.read_text()
    try:
        overrides = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpaceError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                         f"{str(exc).splitlines()[0]}") from None
    return resolve_space(overrides, source=str(path))


def resolve_space(overrides: Any, source: str = "space") -> dict[str, Any]:
    """The default space with `overrides` (a partial space) replacing its entries; validated."""
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise SpaceError(f"{source}: expected a mapping of parameter -> range/choices/constant")
    space = default_space()
    space.update(copy.deepcopy(overrides))
    validate_space(space, source=source)
    return space


def validate_space(space: dict[str, Any], source: str = "space") -> None:
    """Raise SpaceError for unknown keys or malformed entries (before any trial starts)."""
    unknown = sorted(set(space) - set(HYPERPARAMETERS))
    if unknown:
        raise SpaceError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(HYPERPARAMETERS)}")
    missing = [name for name in HYPERPARAMETERS if name not in space]
    if missing:
        raise SpaceError(f"{source}: missing key(s) {', '.join(missing)}")
    for name, spec in space.items():
        _validate_entry(name, spec, f"{source}: {name}")


def _validate_entry(name: str, spec: Any, where: str) -> None:
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
            # The ends, and for a float range a point inside it that is not a whole number (an
            # integer field given a float range would otherwise fail only inside a trial).
            inside = [] if isinstance(low, int) and isinstance(high, int) else [low + (high - low) * 0.382]
            for value in (low, high, *inside):
                _check_value(name, value, where)
            return
        raise SpaceError(f"{where}: expected {{low, high[, log]}} or {{choices}}, got keys {sorted(keys)}")
    if HYPERPARAMETERS[name].per_layer and isinstance(spec, list):
        if not 1 <= len(spec) <= MAX_HEAD_LAYERS:
            raise SpaceError(f"{where}: a fixed head has 1-{MAX_HEAD_LAYERS} layers")
        _check_value(name, spec, where)
        return
    _check_value(name, spec, where)


def _check_value(name: str, value: Any, where: str) -> None:
    """One value of `name`, checked by building a TrainConfig with it (what a trial will do)."""
    if name in _counts():
        ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_HEAD_LAYERS
    elif name in _switches():
        ok = isinstance(value, bool)
    else:
        hp = HYPERPARAMETERS[name]
        if hp.per_layer and not isinstance(value, list):
            value = [value]  # one layer's width
        assert hp.target is not None  # only counts and switches (handled above) have none
        try:
            _build({hp.target: value})
            ok = True
        except ConfigError:
            ok = False
    if not ok:
        raise SpaceError(f"{where}: invalid value {value!r}")


def _build(targets: dict[str, Any], **fixed: Any) -> TrainConfig:
    """A TrainConfig with `targets` ({"lr": v, "model.dropout": v}) set over `fixed` fields."""
    values: dict[str, Any] = {"model": {"image_size": 32, "weights": None}}
    values.update(fixed)
    for target, value in targets.items():
        section = values
        *parents, leaf = target.split(".")
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = value
    return TrainConfig.from_dict(values)


class SpaceSampler:
    """Optuna define-by-run function for a space dict (a class, so Tune can pickle the searcher).

    Returns the constants; Ray's OptunaSearch merges them with the suggested values, so a trial's
    config is the flat dict of everything `to_train_config` needs.
    """

    def __init__(self, space: dict[str, Any]):
        validate_space(space)
        self.space = copy.deepcopy(space)

    def __call__(self, trial) -> dict[str, Any]:
        drawn: dict[str, Any] = {}      # every value of this trial, sampled or constant
        constants: dict[str, Any] = {}  # what Optuna did not suggest
        for name, hp in HYPERPARAMETERS.items():
            if hp.only_if and not drawn[hp.only_if]:
                continue
            spec = self.space[name]
            if hp.per_layer and isinstance(spec, list):
                constants[name] = drawn[name] = list(spec)  # a fixed head; the layer count is moot
            elif hp.per_layer:
                for i in range(1, drawn[hp.per_layer] + 1):
                    self._draw(trial, f"{name}_{i}", spec, constants)
            else:
                drawn[name] = self._draw(trial, name, spec, constants)
        return constants

    @staticmethod
    def _draw(trial, name: str, spec: Any, constants: dict) -> Any:
        if not isinstance(spec, dict):
            constants[name] = spec
            return spec
        if "choices" in spec:
            return trial.suggest_categorical(name, spec["choices"])
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if isinstance(low, int) and isinstance(high, int):
            return trial.suggest_int(name, low, high, log=log)
        return trial.suggest_float(name, float(low), float(high), log=log)


def check_points(points: Any, space: dict[str, Any], source: str = "points_to_evaluate") -> tuple[dict[str, Any], ...]:
    """Configurations for the study to run first, as Optuna names their parameters (`head_units_1`
    ... for per-layer ones), checked against `space`: the searcher would run a value outside its
    range with only a warning. A parameter a point leaves out is sampled as usual."""
    if not isinstance(points, (list, tuple)):
        raise SpaceError(f"{source}: expected a list of configurations, got {type(points).__name__}")
    specs: dict[str, Any] = {}
    for name, hp in HYPERPARAMETERS.items():
        names = [f"{name}_{i}" for i in range(1, MAX_HEAD_LAYERS + 1)] if hp.per_layer else [name]
        specs.update(dict.fromkeys(names, space[name]))
    checked = []
    for number, point in enumerate(points, 1):
        where = f"{source}[{number}]"
        if not isinstance(point, dict):
            raise SpaceError(f"{where}: expected a mapping of parameter -> value")
        for name, value in point.items():
            if name not in specs:
                raise SpaceError(f"{where}: unknown parameter {name!r}; known: {', '.join(specs)}")
            spec = specs[name]
            if not isinstance(spec, dict):
                raise SpaceError(f"{where}: {name} is fixed in the space ({spec!r}); leave it out")
            if "choices" in spec:
                ok = any(value == c and type(value) is type(c) for c in spec["choices"])
            else:
                whole = isinstance(spec["low"], int) and isinstance(spec["high"], int)
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and (not whole or float(value).is_integer()) and spec["low"] <= value <= spec["high"])
            if not ok:
                raise SpaceError(f"{where}: {name}={value!r} is outside the space ({spec})")
        checked.append(copy.deepcopy(point))
    return tuple(checked)


def value_of(name: str, params: dict[str, Any]) -> Any:
    """A hyperparameter's value in a trial config: the per-layer tuple, or `otherwise` when its
    switch is off. KeyError when the trial has none (a trial of a sweep from before it existed)."""
    hp = HYPERPARAMETERS[name]
    if hp.per_layer:
        if name in params:
            return tuple(params[name])  # a fixed head
        return tuple(params[f"{name}_{i}"] for i in range(1, int(params[hp.per_layer]) + 1))
    if hp.only_if and not params.get(hp.only_if, True):
        return hp.otherwise
    return params[name]


def to_train_config(params: dict[str, Any], *, image_size: int, weights: str | None,
                    epochs: int, seed: int, patience: int, use_feature_cache: bool = True) -> TrainConfig:
    """A trial config -> the `TrainConfig` that `cxr_model.fit` trains.

    Each hyperparameter goes to its declared target; one a trial lacks keeps the config default."""
    targets = {}
    for name, hp in HYPERPARAMETERS.items():
        if hp.target is None:
            continue
        try:
            targets[hp.target] = value_of(name, params)
        except KeyError:
            continue
    return _build(targets, epochs=epochs, seed=seed, patience=patience, use_feature_cache=use_feature_cache,
                  model={"image_size": image_size, "weights": weights})


def result_params() -> list[str]:
    """The hyperparameter columns of the results table, in declaration order (counts are implied
    by their per-layer hyperparameter: `head_units` "512-128" has two layers)."""
    counts = _counts()
    return [name for name in HYPERPARAMETERS if name not in counts]


def param_columns(params: dict[str, Any]) -> dict[str, Any]:
    """A trial config as the results table shows it: per-layer values as one "512-128" column,
    a switched-off hyperparameter at its `otherwise` value."""
    out: dict[str, Any] = {}
    for name in result_params():
        try:
            value = value_of(name, params)
        except KeyError:
            value = None
        out[name] = "-".join(str(int(v)) for v in value) if HYPERPARAMETERS[name].per_layer else value
    return out


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
