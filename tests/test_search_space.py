"""The search space: each hyperparameter declared once; defaults, space files (unknown keys are
errors), validation by building the config, sampling, mapping to TrainConfig, result columns."""
from __future__ import annotations

import dataclasses
import json

import optuna
import pytest

from cxr_model import ModelConfig, TrainConfig
from cxr_search import space as space_module
from cxr_search.space import (
    HYPERPARAMETERS,
    METRIC,
    MODE,
    Hyperparameter,
    SpaceError,
    SpaceSampler,
    default_space,
    load_space,
    param_columns,
    result_params,
    to_train_config,
    value_of,
)


def head_units_of(params):
    return value_of("head_units", params)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(space, n=40, seed=0):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    sampler = SpaceSampler(space)
    configs = []
    for _ in range(n):
        trial = study.ask()
        constants = sampler(trial)
        configs.append({**trial.params, **constants})
        study.tell(trial, 0.5)
    return configs


def test_metric_is_validation_auc_maximised():
    assert (METRIC, MODE) == ("val_auc", "max")


def test_default_space_samples_valid_train_configs():
    configs = _sample(load_space(None))
    for params in configs:
        units = head_units_of(params)
        assert 1 <= len(units) <= 3 and len(units) == params["head_layers"]
        assert all(64 <= u <= 1024 for u in units)
        assert 0 <= params["dropout"] <= 0.7 and 1e-5 <= params["lr"] <= 1e-2
        assert params["trainable_blocks"] in (0, 1, 2)
        # widths of layers the head does not have are not sampled (TPE learns them per layer)
        assert f"head_units_{len(units) + 1}" not in params
        assert ("aug_strength" in params) == params["augment"]
        cfg = to_train_config(params, image_size=32, weights=None, epochs=2, seed=0, patience=2)
        assert cfg.model.head_units == units
        assert cfg.model.aug_strength == (params["aug_strength"] if params["augment"] else 0.0)
    # "no augmentation" with a frozen base (the cheap, cached-feature trials) really occurs
    assert any(not p["augment"] and p["trainable_blocks"] == 0 for p in configs)
    assert any(p["augment"] for p in configs)


def test_yaml_space_file_overrides_and_fixes_values(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 1.0e-4, high: 1.0e-3, log: true}\nhead_units: [128, 64]\n"
                    "trainable_blocks: 0\naugment: false\nhead_pooling: {choices: [avg]}\n")
    space = load_space(path)
    assert space["dropout"] == default_space()["dropout"]  # untouched entries keep their defaults
    for params in _sample(space, n=10):
        assert 1e-4 <= params["lr"] <= 1e-3
        assert head_units_of(params) == (128, 64)
        assert params["trainable_blocks"] == 0 and params["augment"] is False
        assert params["head_pooling"] == "avg"
        cfg = to_train_config(params, image_size=32, weights=None, epochs=1, seed=0, patience=1)
        assert cfg.model.base_is_fixed  # frozen + no augmentation: the feature cache applies


def test_json_space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"batch_size": {"choices": [8, 16]}, "dropout": 0.25}))
    params = _sample(load_space(path), n=5)
    assert {p["batch_size"] for p in params} <= {8, 16} and all(p["dropout"] == 0.25 for p in params)


@pytest.mark.parametrize("text, message", [
    ("learning_rate: {low: 0.001, high: 0.01}\n", "unknown key(s) learning_rate"),
    ("lr: {low: 0.01, high: 0.001}\n", "lr: low must be below high"),
    ("lr: {low: 0, high: 0.01, log: true}\n", "lr: a log range needs low > 0"),
    ("head_pooling: {choices: [max]}\n", "head_pooling: invalid value 'max'"),
    ("label_smoothing: {low: 0.0, high: 0.6}\n", "label_smoothing: invalid value 0.6"),  # TrainConfig says < 0.5
    ("trainable_blocks: {low: 0.0, high: 2.0}\n", "trainable_blocks: invalid value"),   # floats for an int field
    ("augment: 1\n", "augment: invalid value 1"),
    ("batch_size: {choices: [16, true]}\n", "batch_size: invalid value True"),
    ("lr: [0.1\n", "not valid YAML"),
    ("head_layers: {low: 1, high: 5}\n", "head_layers"),
    ("dropout: {low: 0.1, high: 0.5, step: 0.1}\n", "dropout: expected"),
    ("trainable_blocks: {choices: []}\n", "choices must be a non-empty list"),
    ("- lr\n", "expected a mapping"),
])
def test_bad_space_files_fail_with_one_clear_line(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_a_bad_space_file_as_a_user_error(tmp_path, capsys):
    from cxr_search.main import main

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text("{}")
    bad = tmp_path / "space.yaml"
    bad.write_text("momentum: {low: 0.1, high: 0.9}\n")
    code = main(["search", str(prepared), "--out", str(tmp_path / "run"), "--space", str(bad)])
    assert code == 2
    assert "cxr: error:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def _field(cfg: TrainConfig, target: str):
    for part in target.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_hyperparameter_names_a_real_config_field_and_reaches_it():
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, hp in HYPERPARAMETERS.items():
        if hp.target is None:
            continue
        section, _, leaf = hp.target.rpartition(".")
        assert leaf in (model_fields if section == "model" else train_fields), name
    for params in _sample(load_space(None), n=20, seed=3):
        cfg = to_train_config(params, image_size=32, weights=None, epochs=1, seed=0, patience=1)
        for name, hp in HYPERPARAMETERS.items():
            if hp.target is not None:
                expected = value_of(name, params)
                assert _field(cfg, hp.target) == (tuple(expected) if hp.per_layer else expected), name


def test_label_smoothing_is_searched_and_reaches_train_config():
    configs = _sample(load_space(None), n=20, seed=1)
    values = [p["label_smoothing"] for p in configs]
    assert all(0.0 <= v <= 0.2 for v in values) and len(set(values)) > 5
    cfg = to_train_config(configs[0], image_size=32, weights=None, epochs=1, seed=0, patience=1)
    assert cfg.label_smoothing == values[0]
    assert param_columns(configs[0])["label_smoothing"] == values[0]
    assert "label_smoothing" in result_params()


def test_a_hyperparameter_declared_once_flows_everywhere(monkeypatch):
    """One new entry in HYPERPARAMETERS (here: the existing `hflip` field) is in the default space,
    validated against its config field, sampled, set in the TrainConfig and shown in the results."""
    monkeypatch.setitem(HYPERPARAMETERS, "hflip", Hyperparameter("model.hflip", {"choices": [False, True]}))
    assert default_space()["hflip"] == {"choices": [False, True]}
    with pytest.raises(SpaceError, match="hflip: invalid value 'yes'"):
        space_module.resolve_space({"hflip": "yes"})  # ModelConfig rejects it, so the space does
    configs = _sample(load_space(None), n=12, seed=2)
    assert {p["hflip"] for p in configs} == {False, True}
    for params in configs:
        cfg = to_train_config(params, image_size=32, weights=None, epochs=1, seed=0, patience=1)
        assert cfg.model.hflip is params["hflip"]
        assert param_columns(params)["hflip"] is params["hflip"]


def test_a_trial_from_before_a_hyperparameter_existed_keeps_the_config_default():
    params = _sample(load_space(None), n=1)[0]
    del params["label_smoothing"]
    cfg = to_train_config(params, image_size=32, weights=None, epochs=1, seed=0, patience=1)
    assert cfg.label_smoothing == TrainConfig().label_smoothing
    assert param_columns(params)["label_smoothing"] is None


def test_demo_space_is_merged_with_the_defaults(tmp_path):
    from cxr_search.demo import DEMO_SPACE, demo_config

    cfg = demo_config(tmp_path)
    assert set(cfg.space) == set(HYPERPARAMETERS)  # e.g. label_smoothing comes from the defaults
    assert "label_smoothing" not in DEMO_SPACE
    for name, spec in DEMO_SPACE.items():
        assert cfg.space[name] == spec


def _points_config(tmp_path, points, seed=0):
    from cxr_search.config import SearchConfig

    return SearchConfig(prepared=str(tmp_path / "p"), out=str(tmp_path / "run"), seed=seed, concurrency=8,
                        space={"trainable_blocks": 0, "augment": False}, points_to_evaluate=points)


def _suggestions(cfg, n):
    from cxr_search.tuner import build_searcher

    searcher = build_searcher(cfg)
    return [searcher.suggest(f"t{i}") for i in range(n)]


def test_points_to_evaluate_are_the_first_trials_whatever_the_seed(tmp_path):
    space = {**load_space(None), "trainable_blocks": 0, "augment": False}
    points = [{k: v for k, v in c.items() if k not in ("trainable_blocks", "augment")}
              for c in _sample(space, n=4, seed=3)]
    fixed = {"trainable_blocks": 0, "augment": False}
    for seed in (0, 1):
        first = _suggestions(_points_config(tmp_path / str(seed), points, seed=seed), 5)
        assert first[:4] == [{**p, **fixed} for p in points]  # in order, whatever TPE's seed
        assert first[4] not in first[:4]  # then TPE's own draws
    # without points, two seeds start differently: the points above are what made them agree
    assert _suggestions(_points_config(tmp_path / "a", (), seed=0), 1) != _suggestions(
        _points_config(tmp_path / "b", (), seed=1), 1)


def test_points_to_evaluate_survive_the_saved_config(tmp_path):
    from cxr_search.config import SearchConfig

    cfg = _points_config(tmp_path, [{"lr": 1e-3, "head_layers": 2, "head_units_1": 64, "head_units_2": 128,
                                     "head_pooling": "avg"}])
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.points_to_evaluate[0]["head_units_2"] == 128


@pytest.mark.parametrize("point, message", [
    ({"learning_rate": 1e-3}, "points_to_evaluate\\[1\\]: unknown parameter 'learning_rate'"),
    ({"lr": 0.5}, "lr=0.5 is outside the space"),
    ({"head_units_1": 64.5}, "head_units_1=64.5 is outside the space"),
    ({"batch_size": 48}, "batch_size=48 is outside the space"),
    ({"head_pooling": True}, "head_pooling=True is outside the space"),
    ({"trainable_blocks": 1}, "trainable_blocks is fixed in the space"),
    ("lr=1e-3", "expected a mapping"),
])
def test_a_point_outside_the_space_is_refused_before_the_sweep(tmp_path, point, message):
    from cxr_datasets.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _points_config(tmp_path, [point])
