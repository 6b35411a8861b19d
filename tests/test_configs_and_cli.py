"""Configs check themselves (ConfigError, a ValueError) and the three CLIs take their defaults
from the config dataclasses by one pattern: options default to None, the dataclass fills in."""
from __future__ import annotations

import dataclasses
import json

import pytest

from cxr_datasets.config import PrepareConfig
from cxr_datasets.errors import ConfigError, CxrError
from cxr_model.config import EvalConfig, ModelConfig, TrainConfig
from cxr_search.config import SearchConfig
from cxr_search.main import build_parser, main


def _cfg(tmp_path, **values):
    return SearchConfig(prepared=str(tmp_path / "prepared"), out=str(tmp_path / "run"), **values)


@pytest.mark.parametrize("values, fragment", [
    ({"trials": 0}, "trials"), ({"max_epochs": 0}, "max_epochs"), ({"reduction_factor": 1}, "reduction_factor"),
    ({"concurrency": 0}, "concurrency"), ({"gpus_per_trial": -0.5}, "gpus_per_trial"),
    ({"cpus_per_trial": "two"}, "cpus_per_trial"), ({"n_boot": 0}, "n_boot"), ({"patience": 0}, "patience"),
    ({"threshold_method": "f1"}, "threshold_method"), ({"trials": 2.5}, "trials"),
    ({"space": {"lr": {"low": 1, "high": 0}}}, "lr: low must be below high"),
    ({"space": {"momentum": 0.9}}, r"unknown key\(s\) momentum"),
    ({"address": "ray://head:10001"}, "storage"),
    ({"formats": ("onnx",)}, "formats must include keras"), ({"formats": "keras,tflite"}, "got keras,tflite"),
])
def test_search_config_checks_itself(tmp_path, values, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        _cfg(tmp_path, **values)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_search_config_completes_a_partial_space_and_round_trips(tmp_path):
    cfg = _cfg(tmp_path, space={"lr": 1e-3}, formats="onnx,keras")
    assert cfg.space["lr"] == 1e-3 and "label_smoothing" in cfg.space
    assert cfg.formats == ("keras", "onnx")  # a tuple in EXPORT_FORMATS' order, also after JSON
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save()
    assert SearchConfig.load(cfg.run_dir) == cfg


def test_search_config_from_dict_rejects_unknown_keys(tmp_path):
    values = {**_cfg(tmp_path).to_dict(), "trails": 4}
    with pytest.raises(ConfigError, match="unknown SearchConfig field.*trails"):
        SearchConfig.from_dict(values)


def test_eval_config_checks_itself():
    assert EvalConfig().n_boot == SearchConfig.__dataclass_fields__["n_boot"].default  # one default
    for values in ({"n_boot": 0}, {"threshold_method": "f1"}, {"target_sensitivity": 1.5}):
        with pytest.raises(ConfigError):
            EvalConfig(**values)


@pytest.mark.parametrize("values, fragment", [
    ({"replicas": 0}, "replicas"), ({"port": 70000}, "port"), ({"max_upload_mb": 0}, "max-upload-mb"),
    ({"max_queued": 0}, "max-queued"), ({"token": "short"}, "16 characters"), ({"host": "0.0.0.0"}, "beyond this machine"),
])
def test_serve_config_checks_itself(values, fragment):
    from cxr_model.serve import ServeConfig

    with pytest.raises(ConfigError, match=fragment) as err:
        ServeConfig(model_dir="m", **values)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def _option_defaults(command: str) -> dict[str, str]:
    """{dest: the default shown in its help} of every option of `cxr COMMAND`."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    out = {}
    for action in sub._actions:
        assert action.default in (None, False, "==SUPPRESS==") or action.dest in ("split", "batch_size", "out"), \
            f"--{action.dest} has its own default {action.default!r}: take it from the config dataclass"
        if action.help and "(default: " in action.help:
            out[action.dest] = action.help.rsplit("(default: ", 1)[1].rstrip(")")
    return out


@pytest.mark.parametrize("command, classes", [
    ("prepare", (PrepareConfig,)),
    ("train", (ModelConfig, TrainConfig, EvalConfig)),
    ("evaluate", (EvalConfig,)),
    ("search", (SearchConfig,)),
])
def test_cli_help_shows_the_config_dataclass_defaults(command, classes):
    shown = _option_defaults(command)
    checked = 0
    for cls in classes:
        for f in dataclasses.fields(cls):
            # a None default means something ("all CPUs") that the help says in words
            if f.name in shown and f.default not in (dataclasses.MISSING, None):
                value = f.default
                text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
                assert shown[f.name] == text, (command, f.name)
                checked += 1
    assert checked >= (1 if command == "evaluate" else 5)


def test_train_flags_given_reach_the_config_and_the_rest_are_dataclass_defaults(tmp_path, monkeypatch):
    from cxr_model import cli as model_cli

    monkeypatch.setattr(model_cli, "read_manifest", lambda _: {"options": {"image_size": 64}})
    args = build_parser().parse_args(["train", "p", "--out", "o", "--dropout", "0.1", "--head-units", "64,32",
                                      "--label-smoothing", "0.1", "--weights", "none"])
    cfg = model_cli._train_config(args)
    expected = TrainConfig(model=ModelConfig(image_size=64, weights=None, dropout=0.1, head_units=(64, 32)),
                           label_smoothing=0.1)
    assert cfg == expected


@pytest.mark.parametrize("argv, fragment", [
    (["train", "{prepared}", "--out", "{tmp}/m", "--dropout", "1.5"], "dropout must be in"),
    (["train", "{prepared}", "--out", "{tmp}/m", "--label-smoothing", "0.5"], "label_smoothing"),
    (["search", "{prepared}", "--out", "{tmp}/r", "--trials", "0"], "trials must be an integer >= 1"),
    (["search", "{prepared}", "--out", "{tmp}/r", "--reduction-factor", "1"], "reduction_factor"),
    (["search", "{prepared}", "--out", "{tmp}/r", "--formats", "onnx"], "formats must include keras"),
    (["train", "{prepared}", "--out", "{tmp}/m", "--formats", "keras,pt"], "formats must include keras"),
    (["prepare", "{prepared}", "{tmp}/out", "--val-fraction", "0.9"], "val fraction"),
])
def test_a_bad_config_value_is_one_line_from_the_cli(tmp_path, capsys, argv, fragment):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps({"options": {"image_size": 32}}))
    code = main([a.format(prepared=prepared, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cxr: error: ") and fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_config_error_is_a_value_error_and_a_user_error():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, CxrError)
    with pytest.raises(ValueError):
        ModelConfig(dropout=2.0)


def test_prepare_takes_a_config_or_its_fields_never_an_unknown_one(tmp_path):
    import cxr_datasets
    from cxr_datasets.config import PrepareConfig
    from cxr_datasets.errors import ConfigError

    with pytest.raises(ConfigError, match="imagesize"):
        cxr_datasets.prepare(tmp_path / "src", tmp_path / "out", imagesize=64)
    with pytest.raises(ConfigError, match="not both"):
        cxr_datasets.prepare(tmp_path / "src", tmp_path / "out", PrepareConfig(), image_size=64)
