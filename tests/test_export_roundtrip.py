"""Export folders: contents, strict JSON, reload in a fresh process, replace-whole-or-not-at-all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cxr_datasets.errors import CxrError
from cxr_model.evaluate import metrics_from_probs
from cxr_model.export import export, load_model

SIZE = 32
# Tests of the folder's handling, not of the formats (SavedModel and ONNX against `cxr predict`:
# test_export_portable.py): model.keras alone, without the ~20 s TensorFlow conversion to them.
KERAS_ONLY = ("keras",)


@pytest.fixture(scope="module")
def tiny():
    """(model, train config, images): a 32-px VGG16 with a random, seeded base and head."""
    from cxr_model.config import ModelConfig, TrainConfig
    from cxr_model.model import build_model

    cfg = TrainConfig(model=ModelConfig(image_size=SIZE, weights=None, head_units=(8,), aug_strength=0.1))
    model = build_model(cfg.model, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (12, SIZE, SIZE, 1), dtype=np.uint8)
    return model, cfg, images


def _fake_metrics(n=40):
    rng = np.random.default_rng(0)
    labels = np.r_[0, 1, rng.integers(0, 2, n - 2)]
    probs = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, n), 0, 1)
    return {"val": metrics_from_probs(labels, probs, threshold=0.5, n_boot=100),
            "test": metrics_from_probs(labels, probs, threshold=0.5, n_boot=100)}


def _export(tiny, run_dir, **kwargs):
    model, cfg, _ = tiny
    history = {"loss": [0.7, 0.6], "val_loss": [0.71, 0.65], "accuracy": [0.5, 0.6], "val_accuracy": [0.5, 0.55]}
    return export(model, run_dir, train_cfg=cfg, threshold=0.42, metrics=_fake_metrics(), manifest_hash="abc123",
                  history=history, threshold_method="youden", resize="pad", **kwargs)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    return _export(tiny, tmp_path_factory.mktemp("export") / "model", formats=KERAS_ONLY)


def test_export_writes_model_card_metrics_and_plots(exported, tiny):
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["metrics.json", "model.keras", "model_card.json", "plots"]  # --formats keras
    card = json.loads((exported / "model_card.json").read_text())
    assert card["files"]["onnx"] is None and card["files"]["saved_model"] is None
    assert [a["path"] for a in card["files"]["artifacts"]] == ["model.keras"]
    assert card["threshold"] == 0.42 and card["threshold_selection"]["method"] == "youden"
    assert card["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert card["input"] == {"shape": [SIZE, SIZE, 1], "dtype": "uint8", "image_size": SIZE, "resize": "pad",
                             "grayscale": True, "preprocess": "cxr_datasets.preprocess_file"}
    assert card["data"]["manifest_hash"] == "abc123"
    assert card["config"] == tiny[1].to_dict()
    assert {"keras", "numpy", "python"} <= set(card["versions"])
    auc = card["metrics"]["test"]["roc_auc"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert not {"roc", "pr", "calibration"} & set(card["metrics"]["test"])  # curves: metrics.json only
    metrics = json.loads((exported / "metrics.json").read_text())
    assert len(metrics["metrics"]["val"]["roc"]["fpr"]) > 2 and metrics["history"]["loss"] == [0.7, 0.6]
    plots = sorted(p.name for p in (exported / "plots").iterdir())
    per_split = ["confusion_{}.png", "roc_{}.png", "pr_{}.png", "reliability_{}.png"]
    listed = ["curves.png"] + [n.format(s) for s in ("val", "test") for n in per_split]
    assert plots == sorted(listed)
    assert card["files"]["plots"] == [f"plots/{n}" for n in listed]


def test_undefined_metrics_become_null_in_strict_json(tiny, tmp_path):
    model, cfg, _ = tiny
    one_class = metrics_from_probs([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.6], threshold=0.5, n_boot=20)
    run_dir = export(model, tmp_path / "m", train_cfg=cfg, threshold=0.5, metrics=one_class, formats=KERAS_ONLY)
    text = (run_dir / "model_card.json").read_text()
    assert "NaN" not in text
    card = json.loads(text)
    assert card["metrics"]["test"]["roc_auc"]["value"] is None  # a bare evaluate() dict is the test's


def test_reloaded_in_a_fresh_process_gives_identical_predictions(exported, tiny, tmp_path):
    model, _, images = tiny
    np.save(tmp_path / "x.npy", images)
    expected = model.predict(images, verbose=0)
    script = textwrap.dedent(f"""
        import numpy as np, keras
        from cxr_model.export import load_model
        model, card = load_model({str(exported)!r})
        keras.saving.load_model({str(exported / "model.keras")!r}, safe_mode=True)  # no unsafe lambdas
        np.save({str(tmp_path / "y.npy")!r}, model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0))
        print(card["threshold"])
    """)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "0.42"
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)


def test_export_refuses_a_non_empty_folder_unless_overwrite(tiny, tmp_path):
    run_dir = tmp_path / "model"
    run_dir.mkdir()
    (run_dir / "old.txt").write_text("previous run")
    with pytest.raises(CxrError, match="--overwrite"):
        _export(tiny, run_dir, formats=KERAS_ONLY)
    assert (run_dir / "old.txt").exists()
    _export(tiny, run_dir, overwrite=True, formats=KERAS_ONLY)
    assert not (run_dir / "old.txt").exists() and (run_dir / "model.keras").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or retired folders left


def test_a_failed_export_leaves_the_previous_one_untouched(tiny, tmp_path, monkeypatch):
    import importlib

    export_module = importlib.import_module("cxr_model.export")  # `cxr_model.export` is also the function

    run_dir = _export(tiny, tmp_path / "model", formats=KERAS_ONLY)
    card_before = (run_dir / "model_card.json").read_text()

    def broken_plots(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "_write_plots", broken_plots)
    with pytest.raises(RuntimeError, match="disk full"):
        _export(tiny, run_dir, overwrite=True, formats=KERAS_ONLY)
    assert (run_dir / "model_card.json").read_text() == card_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_load_model_names_what_is_missing(tmp_path):
    with pytest.raises(CxrError, match="model.keras is missing"):
        (tmp_path / "model_card.json").write_text("{}")
        load_model(tmp_path)
    with pytest.raises(CxrError, match="not an exported model"):
        load_model(tmp_path / "nowhere")
