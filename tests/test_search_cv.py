"""`cxr search --cv 3` on the tiny data set: each CV trial trains 3 fold models and keeps them, the
feature cache is computed for fold 1 and serves every other fold, ASHA judges fold 1 first, and
the export is ONE model.keras, the mean of the best trial's fold models, its threshold chosen on the
out-of-fold predictions; plain Keras in a child process that knows nothing of the project loads it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_search_sweep import small_config

K = 3
CV_TRIALS = 4
FROZEN = "trainable_blocks: 0\naugment: false\n"


@pytest.fixture(scope="module")
def cv_sweep(ray_session, prepared_small, tmp_path_factory):
    from cxr_search.run import run_search

    tmp = tmp_path_factory.mktemp("cv")
    # reduction factor 3: ASHA's rungs at fold 1 and fold 3; concurrency 1 keeps its decisions
    # independent of timing
    cfg = small_config(prepared_small, tmp / "run", tmp, FROZEN, trials=CV_TRIALS, max_epochs=2, cv=K,
                       reduction_factor=3, patience=2)
    return cfg, run_search(cfg)


@pytest.mark.timeout(600)
def test_each_cv_trial_trains_k_fold_models_and_keeps_them(cv_sweep):
    cfg, summary = cv_sweep
    assert summary["finished"]
    table = pd.read_csv(cfg.run_dir / "results.csv")
    assert len(table) == CV_TRIALS and (table["status"] == "TERMINATED").all()
    for col in ("val_auc", "cv_se", "folds_done", "val_auc_f1", "fold_best_epochs", "stopped_by"):
        assert col in table, col
    complete = table[table["folds_done"] == K]
    assert len(complete) >= 1 and (complete["stopped_by"] == "folds").all()
    # a trial ASHA stopped (inside fold 1, or after it) is listed after the complete ones
    stopped = table[table["stopped_by"] == "asha"]
    assert len(stopped) >= 1 and (stopped["folds_done"] < K).all()
    assert table["folds_done"].tolist() == sorted(table["folds_done"], reverse=True)
    for _, row in complete.iterrows():
        folds = [row[f"val_auc_f{f}"] for f in range(1, K + 1)]
        assert row["val_auc"] == pytest.approx(np.mean(folds))
        assert row["cv_se"] == pytest.approx(np.std(folds, ddof=1) / np.sqrt(K))
        checkpoint = Path(row["checkpoint"])
        assert sorted(p.name for p in checkpoint.glob("fold_*")) == [f"fold_{f}" for f in range(1, K + 1)]
        state = json.loads((checkpoint / "state.json").read_text())
        assert [f["fold"] for f in state["folds"]] == [1, 2, 3]
        assert len(list(checkpoint.parent.glob("checkpoint_*"))) == 1
    # fold 1 reports every epoch (ASHA's early rungs judge it), then one report per completed fold;
    # the budget ASHA reads only grows
    for trial_dir in Path(cfg.experiment_path).glob("trial_*"):
        rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line]
        folds = [r["folds_done"] for r in rows if r["folds_done"] > 0]
        assert folds == list(range(1, len(folds) + 1))
        epochs_of_fold_1 = [r["cv_budget"] for r in rows if r["folds_done"] == 0]
        assert epochs_of_fold_1 == list(range(1, len(epochs_of_fold_1) + 1))
        budgets = [r["cv_budget"] for r in rows]
        assert budgets == sorted(budgets) and budgets[-1] <= K * cfg.max_epochs


@pytest.mark.timeout(600)
def test_folds_are_recorded_and_the_feature_cache_serves_every_fold(cv_sweep, prepared_small):
    import cxr_datasets

    cfg, _ = cv_sweep
    folds = pd.read_csv(cfg.run_dir / "folds.csv")
    ids = set()
    for split in ("train", "val"):
        ids |= set(cxr_datasets.load(prepared_small, split)[2]["patient_id"])
    assert set(folds["patient_id"]) == ids and set(folds["fold"]) == set(range(1, K + 1))
    # fold 1's training part and held-out part, computed once; every other fold of every trial gathered
    assert len(list(Path(cfg.feature_cache_dir).glob("*.npy"))) == 2


CHILD = """
import json, sys, numpy as np, keras
model = keras.saving.load_model(sys.argv[1], safe_mode=True, compile=False)
print(json.dumps({"probs": model.predict(np.load(sys.argv[2]), verbose=0).tolist(),
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                                    ("cxr_model", "cxr_search", "cxr_datasets"))}))
"""


@pytest.mark.timeout(600)
def test_the_export_is_the_fold_ensemble_and_plain_keras_loads_it(cv_sweep, prepared_small, tmp_path):
    import cxr_datasets
    from cxr_model.model import inference_model, predict_proba
    from cxr_search.best import load_cv_checkpoint

    cfg, summary = cv_sweep
    best = summary["best"]
    table = summary["table"]
    assert best["trial_id"] == table.iloc[0]["trial_id"] and table.iloc[0]["folds_done"] == K
    card = json.loads((cfg.run_dir / "best" / "model_card.json").read_text())
    assert card["threshold_selection"]["split"] == "oof"
    assert card["extra"]["cv"]["k"] == K and card["extra"]["cv"]["members"] == K
    members, state, _ = load_cv_checkpoint(table.iloc[0]["checkpoint"])
    assert len(members) == K
    x_test, _, _ = cxr_datasets.load(prepared_small, "test")
    images = x_test[:16]
    np.save(tmp_path / "x.npy", images)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-I", "-c", CHILD, str(cfg.run_dir / "best" / "model.keras"),
                           str(tmp_path / "x.npy")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    mean = np.mean([inference_model(m).predict(images, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(np.array(out["probs"]), mean, atol=1e-5, rtol=0)
    # the threshold is chosen on the out-of-fold predictions of all of train + val
    n_pool = sum(len(cxr_datasets.load(prepared_small, s)[1]) for s in ("train", "val"))
    assert card["metrics"]["val"]["n"] == n_pool
    assert best["cv"]["best_fold"]["test_roc_auc"]["value"] is not None
    # `cxr predict`'s path loads it unchanged, Grad-CAM included
    from cxr_model import load_model
    from cxr_model.gradcam import gradcam_heatmaps

    model, _ = load_model(cfg.run_dir / "best")
    np.testing.assert_allclose(predict_proba(model, images), mean[:, 1], atol=1e-5)
    assert gradcam_heatmaps(model, images[:2]).shape[0] == 2


@pytest.mark.timeout(600)
def test_report_shows_the_folds_and_the_ensemble(cv_sweep):
    cfg, summary = cv_sweep
    text = summary["report"].read_text()
    for needle in ("## Cross-validation", "± ", "out-of-fold", "ensemble", "best single fold"):
        assert needle in text, needle


@pytest.mark.slow  # make test-slow: --refit retrains once more; the CV sweep itself stays in make test
@pytest.mark.timeout(600)
def test_refit_exports_the_best_configuration_retrained_on_everything(cv_sweep, tmp_path):
    import dataclasses

    from cxr_model import load_model
    from cxr_search.best import export_cv_best
    from cxr_search.folds import load_pool
    from cxr_search.sweep_report import write_report

    cfg, summary = cv_sweep
    import shutil

    refit_cfg = dataclasses.replace(cfg, out=str(tmp_path / "refit"), refit=True, study=cfg.study_name)
    (tmp_path / "refit").mkdir()
    shutil.copy(cfg.run_dir / "optuna.db", tmp_path / "refit" / "optuna.db")  # the report's Optuna plots
    best = export_cv_best(refit_cfg, summary["table"], load_pool(cfg.prepared, k=K, seed=cfg.seed))
    model, card = load_model(tmp_path / "refit" / "best")
    assert model.name == "cxr_vgg16_inference"  # one model, not the ensemble
    epochs = int(np.median([int(e) for e in str(summary["table"].iloc[0]["fold_best_epochs"]).split("-")]))
    assert card["config"]["epochs"] == best["cv"]["refit"]["epochs"] == max(1, epochs)
    assert card["threshold_selection"]["split"] == "oof"
    assert best["cv"]["ensemble_test_roc_auc"] == summary["best"]["cv"]["ensemble_test_roc_auc"]
    text = write_report(refit_cfg, summary["table"], best).read_text()
    assert "refit on all of train + val" in text and "(exported)" in text
