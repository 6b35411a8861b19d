"""Train -> threshold on validation -> one test evaluation -> export, and the `cxr train/evaluate` commands."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest


def test_threshold_is_chosen_on_validation_and_test_is_scored_once(prepared_small, tmp_path, monkeypatch):
    import cxr_datasets
    from cxr_model import ModelConfig, TrainConfig, build_model
    from cxr_model.finalize import finalize

    evaluate_module = importlib.import_module("cxr_model.evaluate")  # `cxr_model.evaluate` is the function
    x_val, y_val, _ = cxr_datasets.load(prepared_small, "val")
    _, y_test, _ = cxr_datasets.load(prepared_small, "test")
    loads, chosen_on, scored = [], [], []
    real_load, real_choose, real_evaluate = cxr_datasets.load, evaluate_module.choose_threshold, evaluate_module.evaluate

    def load_spy(prepared_dir, split, *args, **kwargs):
        loads.append(split)
        return real_load(prepared_dir, split, *args, **kwargs)

    def choose_spy(labels, probs, **kwargs):
        chosen_on.append(np.asarray(labels).copy())
        return real_choose(labels, probs, **kwargs)

    def evaluate_spy(model, images, labels, **kwargs):
        scored.append((np.asarray(labels).copy(), kwargs["threshold"]))
        return real_evaluate(model, images, labels, **kwargs)

    monkeypatch.setattr(cxr_datasets, "load", load_spy)
    finalize_module = importlib.import_module("cxr_model.finalize")  # what finalize calls
    monkeypatch.setattr(finalize_module, "choose_threshold", choose_spy)  # the decision threshold
    monkeypatch.setattr(evaluate_module, "choose_threshold", choose_spy)  # each operating point's
    monkeypatch.setattr(finalize_module, "evaluate", evaluate_spy)
    cfg = TrainConfig(model=ModelConfig(image_size=32, weights=None, head_units=(8,), aug_strength=0.0))
    result = finalize(build_model(cfg.model, seed=0), cfg, prepared_small, tmp_path / "model", n_boot=200,
                      formats=("keras",))

    assert loads == ["val", "test"]  # test is read after the threshold exists, and only once
    # the decision threshold and each fixed operating point: all chosen on validation labels
    assert len(chosen_on) == 1 + len(evaluate_module.OPERATING_POINTS)
    assert all(np.array_equal(labels, y_val) for labels in chosen_on)
    assert len(scored) == 1 and np.array_equal(scored[0][0], y_test)
    assert scored[0][1] == result["threshold"]
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["threshold"] == result["threshold"] == card["metrics"]["test"]["threshold"]
    assert card["metrics"]["val"]["n"] == len(y_val) and card["metrics"]["test"]["n"] == len(y_test)
    assert card["data"]["manifest_hash"] == cxr_datasets.manifest_hash(prepared_small)


def test_cxr_train_then_evaluate_end_to_end(prepared_small, tmp_path, capsys):
    from cxr_search.main import main

    out = tmp_path / "model"
    code = main(["train", str(prepared_small), "--out", str(out), "--weights", "none", "--epochs", "2",
                 "--head-units", "16,8", "--aug-strength", "0", "--batch-size", "16", "--n-boot", "200",
                 "--threshold-method", "sensitivity", "--target-sensitivity", "0.9", "--formats", "keras"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "roc_auc" in printed and "test (n=" in printed and f"exported to {out}" in printed
    card = json.loads((out / "model_card.json").read_text())
    assert card["config"]["model"]["head_units"] == [16, 8] and card["config"]["epochs"] == 2
    assert card["threshold_selection"] == {"method": "sensitivity", "target_sensitivity": 0.9, "split": "val"}
    assert card["metrics"]["val"]["sensitivity"]["value"] >= 0.9  # the target holds where it was set
    assert (out / "plots" / "curves.png").is_file() and (out / "model.keras").is_file()
    assert not (out / "model.onnx").exists() and card["files"]["onnx"] is None  # --formats keras

    # Re-scoring the export at its card's threshold (same bootstrap seed) reproduces the card.
    assert main(["evaluate", str(out), str(prepared_small), "--split", "test", "--n-boot", "200"]) == 0
    printed = capsys.readouterr().out
    auc = card["metrics"]["test"]["roc_auc"]
    assert f"{auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" in printed
    # calibration, PR and the operating points chosen on validation (thresholds from the card)
    test = card["metrics"]["test"]
    for key in ("auprc", "brier", "roc_auc_delong"):
        m = test[key]
        assert f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" in printed, key
    assert "ece (10 bins)" in printed and f"{test['ece']:.3f}" in printed
    for op in card["operating_points"]:
        sens = next(o for o in test["operating_points"] if o["name"] == op["name"])["sensitivity"]
        assert f"{op['name']} (t={op['threshold']:.3f}): sens  " in printed
        assert f"{sens['value']:.3f} [{sens['ci_low']:.3f}, {sens['ci_high']:.3f}]" in printed

    # An existing export is refused before any training happens.
    assert main(["train", str(prepared_small), "--out", str(out), "--weights", "none"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--head-units", "0"], "positive integers"),
    (["--dropout", "1.5"], "dropout"),
])
def test_cxr_train_rejects_bad_flags_in_one_line(prepared_small, tmp_path, capsys, flags, message):
    from cxr_search.main import main

    try:
        code = main(["train", str(prepared_small), "--out", str(tmp_path / "m"), *flags])
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
