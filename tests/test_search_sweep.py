"""One small real sweep (4 trials, 2 epochs, 32 px, random weights) and everything it leaves behind:
the results table, ASHA's early stops, one checkpoint per trial, the Optuna study, the best model
exported and reloadable, and the report with its plots. And a trial whose worker is killed."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray import tune

from cxr_model.config import EXPORT_FORMATS
from cxr_search.config import SearchConfig
from cxr_search.space import load_space

TRIALS = 4
MAX_EPOCHS = 2
# Small heads keep the CPU trials fast; both the cached-feature path and end-to-end trials occur.
# Label smoothing is fixed: the seeded trials below are chosen so that ASHA stops one of them.
TEST_SPACE = "head_layers: 1\nhead_units: {low: 8, high: 64, log: true}\nbatch_size: 32\n" \
             "trainable_blocks: {choices: [0, 1]}\nlr: {low: 1.0e-3, high: 1.0e-2, log: true}\n" \
             "label_smoothing: 0.0\n"


def small_config(prepared, out, tmp_path, space_overrides: str = "", **overrides) -> SearchConfig:
    space_file = tmp_path / "space.yaml"
    space_file.write_text(TEST_SPACE + space_overrides)
    values = dict(prepared=str(prepared), out=str(out), trials=TRIALS, max_epochs=MAX_EPOCHS, grace_period=1,
                  reduction_factor=2, concurrency=1, weights=None, n_boot=50, patience=2, max_failures=0,
                  formats=("keras",),  # the sweep fixture exports every format; other sweeps need model.keras
                  space=load_space(space_file), verbose=0, feature_cache_dir=str(tmp_path / "features"))
    values.update(overrides)
    return SearchConfig(**values)


@pytest.fixture(scope="module")
def sweep(ray_session, prepared_small, tmp_path_factory):
    from cxr_search.run import run_search

    tmp = tmp_path_factory.mktemp("sweep")
    # concurrency 1: trials reach ASHA's rung one after another, so the early stops do not depend on timing
    # MLflow (the optional extra `make test` installs) logs to a local SQLite file when present.
    mlflow = f"sqlite:///{tmp / 'mlflow.db'}" if importlib.util.find_spec("mlflow") else None
    cfg = small_config(prepared_small, tmp / "run", tmp, mlflow=mlflow, formats=EXPORT_FORMATS)
    if mlflow:  # artifacts under tmp: with a SQLite tracking URI MLflow's default is ./mlruns in the cwd
        from mlflow.tracking import MlflowClient
        MlflowClient(tracking_uri=mlflow).create_experiment(
            cfg.study_name, artifact_location=(tmp / "mlflow-artifacts").as_uri())
    summary = run_search(cfg)
    return cfg, summary


def test_results_table_has_every_trial_with_params_metrics_and_status(sweep):
    cfg, summary = sweep
    assert summary["finished"]
    table = pd.read_parquet(cfg.run_dir / "results.parquet")
    assert len(table) == TRIALS and table["trial_id"].is_unique
    assert pd.read_csv(cfg.run_dir / "results.csv")["trial_id"].tolist() == table["trial_id"].tolist()
    assert (table["status"] == "TERMINATED").all()
    for col in ("head_units", "dropout", "lr", "augment", "aug_strength", "trainable_blocks", "batch_size",
                "head_pooling", "label_smoothing", "val_auc", "best_epoch", "epochs_run", "stopped_by", "stopped_early",
                "duration_s", "node_id", "attempts", "checkpoint", "val_auc_e1", "val_auc_e2"):
        assert col in table, col
    assert table["lr"].between(1e-3, 1e-2).all() and table["trainable_blocks"].isin([0, 1]).all()
    assert (table["duration_s"] > 0).all() and table["node_id"].notna().all()
    # val_auc is the best epoch so far: the maximum of the per-epoch values, reached at best_epoch
    epochs = table[["val_auc_e1", "val_auc_e2"]].to_numpy()
    assert np.allclose(table["val_auc"], np.nanmax(epochs, axis=1))
    for _, row in table.iterrows():
        assert row[f"val_auc_e{row['best_epoch']}"] == pytest.approx(row["val_auc"])
        assert row["epochs_run"] == MAX_EPOCHS or row["stopped_early"]
    # frozen base without augmentation trains on cached features; the others end to end
    expected_cache = (table["trainable_blocks"] == 0) & (table["aug_strength"] == 0)
    assert (table["feature_cache"] == expected_cache).all()
    assert table["val_auc"].is_monotonic_decreasing  # sorted best first


def test_asha_stops_weak_trials_after_the_grace_period(sweep):
    cfg, summary = sweep
    table = summary["table"]
    stopped = table[table["stopped_by"] == "asha"]
    assert len(stopped) >= 1
    assert (stopped["epochs_run"] == 1).all() and stopped["val_auc_e2"].isna().all()
    assert (table["stopped_by"] == "max_epochs").any()


def test_each_trial_keeps_only_its_best_checkpoint(sweep):
    cfg, summary = sweep
    for _, row in summary["table"].iterrows():
        trial_dir = Path(row["checkpoint"]).parent
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        assert len(checkpoints) == 1
        state = json.loads((checkpoints[0] / "state.json").read_text())
        assert state["epoch"] == row["best_epoch"] and state["best_value"] == pytest.approx(row["val_auc"])
        # what a finished trial's checkpoint keeps: its state and the weights training changed
        # (not the frozen base, not the optimizer's state that only a retry needed)
        assert sorted(p.name for p in checkpoints[0].iterdir()) == ["state.json", "weights.npz"]
        # MiB: the head alone; or VGG16's block 5 (28 MB) and the head, of the whole 59 MB
        limit = 1 if row["trainable_blocks"] == 0 else 32
        assert (checkpoints[0] / "weights.npz").stat().st_size < limit * 2**20


def test_optuna_study_is_persisted_in_sqlite_with_every_trial(sweep):
    import optuna

    cfg, summary = sweep
    assert (cfg.run_dir / "optuna.db").is_file()
    study = optuna.load_study(study_name=cfg.study_name, storage=f"sqlite:///{cfg.run_dir / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == TRIALS
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # ASHA-stopped trials reach Optuna as COMPLETE with their best-so-far value, as in the table
    assert sorted(t.value for t in trials) == pytest.approx(sorted(summary["table"]["val_auc"]))


def test_best_trial_is_exported_evaluated_once_and_reloads(sweep, prepared_small):
    import keras

    import cxr_datasets
    from cxr_model import ClassAUC, load_model, predict_proba

    cfg, summary = sweep
    best = summary["best"]
    table = summary["table"]
    assert best["trial_id"] == table.iloc[0]["trial_id"]
    model, card = load_model(cfg.run_dir / "best")
    x_val, y_val, _ = cxr_datasets.load(prepared_small, "val")
    probs = predict_proba(model, x_val)
    assert probs.shape == (len(y_val),) and np.all((probs >= 0) & (probs <= 1))
    # the exported model IS the selected one: the validation AUC the sweep ranked it by (Keras'
    # thresholded AUC, as logged by fit) is reproduced exactly by the reloaded model
    auc = ClassAUC()
    auc.update_state(keras.utils.to_categorical(y_val, 2), model.predict(x_val, verbose=0))
    assert float(auc.result()) == pytest.approx(best["val_auc"], abs=1e-6)
    assert card["threshold"] == pytest.approx(best["threshold"])
    test = best["metrics"]["test"]
    assert {"value", "ci_low", "ci_high"} <= set(test["roc_auc"])
    assert test["n"] == len(cxr_datasets.load(prepared_small, "test")[1])
    # RUN/best/ holds every format the README lists (the default --formats)
    assert {"model.keras", "model.onnx", "saved_model"} <= {p.name for p in (cfg.run_dir / "best").iterdir()}


def test_report_has_tables_metrics_and_plots(sweep):
    cfg, summary = sweep
    text = summary["report"].read_text()
    for needle in ("## Best trial", "## Test metrics", "roc_auc", "95% CI", "## Trials", summary["best"]["trial_id"],
                   "## Calibration and operating points", "AUPRC", "Brier", "ECE", "DeLong", "| sens>=0.95 |"):
        assert needle in text
    for name in ("learning_curves.png", "params_vs_val_auc.png", "param_importances.png",
                 # Optuna's own (optuna.visualization.matplotlib), from the study the sweep saved
                 "optuna_history.png", "optuna_parallel_coordinate.png", "optuna_intermediate_values.png"):
        path = cfg.run_dir / "plots" / name
        assert path.stat().st_size > 10_000, name
        assert f"plots/{name}" in text
    assert "Not drawn:" not in text
    import matplotlib.pyplot as plt
    assert plt.get_fignums() == []  # every pyplot figure Optuna opened was closed
    for name in ("confusion_test.png", "roc_test.png", "pr_test.png", "reliability_test.png"):
        assert (cfg.run_dir / "best" / "plots" / name).is_file() and f"best/plots/{name}" in text
    saved = json.loads((cfg.run_dir / "search_config.json").read_text())
    assert saved["trials"] == TRIALS and saved["space"]["head_layers"] == 1


def test_a_second_fresh_sweep_into_the_same_folder_is_refused(sweep):
    from cxr_datasets.errors import CxrError
    from cxr_search.tuner import run_sweep

    cfg, _ = sweep
    with pytest.raises(CxrError, match="--resume"):
        run_sweep(cfg)


class KillWorkerOnce(tune.Callback):
    """SIGKILL the trial's worker process right after it reports `at_epoch` (a real crash:
    no exception, no cleanup; the checkpoint of the epoch before is already in storage)."""

    def __init__(self, at_epoch: int):
        self.at_epoch = at_epoch
        self.killed_pid = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed_pid is None and result.get("epoch") == self.at_epoch:
            self.killed_pid = result["pid"]
            os.kill(self.killed_pid, signal.SIGKILL)


def test_tune_writes_tensorboard_logs_for_every_trial(sweep):
    """README, "Experiment tracking": `tensorboard --logdir RUN/tune` shows every trial's curves."""
    from cxr_search.space import METRIC

    cfg, summary = sweep
    files = sorted(Path(cfg.experiment_path).glob("trial_*/events.out.tfevents.*"))
    assert len(files) == TRIALS
    for path in files:
        assert f"ray/tune/{METRIC}".encode() in path.read_bytes(), path


def test_mlflow_gets_one_run_per_trial_with_params_and_metrics(sweep):
    """--mlflow URI: Ray Tune's MLflow logger, here against a local SQLite tracking file."""
    mlflow = pytest.importorskip("mlflow", reason="the optional extra cxr-tune[mlflow] is not installed")
    from cxr_search.space import METRIC

    cfg, summary = sweep
    client = mlflow.tracking.MlflowClient(tracking_uri=cfg.mlflow)
    experiment = client.get_experiment_by_name(cfg.study_name)
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name != "best"]
    assert len(runs) == TRIALS  # plus the "best" run, checked below
    table = summary["table"].set_index("trial_id")
    for run in runs:
        trial_id = run.data.tags["trial_name"].rsplit("_", 1)[-1]
        assert run.data.metrics[METRIC] == pytest.approx(table.loc[trial_id, METRIC])
        assert float(run.data.params["lr"]) == pytest.approx(table.loc[trial_id, "lr"])


def test_mlflow_logs_the_best_model_with_test_metrics_and_artifacts(sweep):
    """After the export, one run named "best": its config, its test metrics, RUN/best as artifacts."""
    mlflow = pytest.importorskip("mlflow", reason="the optional extra cxr-tune[mlflow] is not installed")

    cfg, summary = sweep
    best = summary["best"]
    client = mlflow.tracking.MlflowClient(tracking_uri=cfg.mlflow)
    run = client.get_run(summary["mlflow_best_run"])
    assert run.info.run_name == "best" and run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_experiment_by_name(cfg.study_name).experiment_id
    test = best["metrics"]["test"]
    assert run.data.metrics["test_roc_auc"] == pytest.approx(test["roc_auc"]["value"])
    assert run.data.metrics["test_roc_auc_ci_low"] == pytest.approx(test["roc_auc"]["ci_low"])
    assert float(run.data.params["lr"]) == pytest.approx(best["params"]["lr"])
    assert float(run.data.params["threshold"]) == pytest.approx(best["threshold"])
    assert run.data.tags["cxr.trial_id"] == best["trial_id"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.keras", "model_card.json", "metrics.json"} <= artifacts
    card = json.loads(Path(client.download_artifacts(run.info.run_id, "model_card.json")).read_text())
    assert card["threshold"] == pytest.approx(best["threshold"])


def test_optuna_plots_it_cannot_draw_are_skipped_with_a_note(tmp_path):
    """A study with one completed trial and no intermediate values: the history is drawn, parallel
    coordinates and intermediate values are left out with their reason, nothing raises."""
    import types

    import matplotlib.pyplot as plt
    import optuna

    from cxr_search.sweep_report import OPTUNA_PLOTS, write_optuna_plots

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="one", storage=url, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=1)
    cfg = types.SimpleNamespace(study_name="one", optuna_url=url)

    drawn, skipped = write_optuna_plots(cfg, tmp_path)

    assert list(drawn) == ["Optuna optimisation history"] and drawn["Optuna optimisation history"].is_file()
    assert skipped == {"Optuna parallel coordinates": "needs at least two completed trials",
                       "Optuna intermediate values (per epoch)": "no trial reported intermediate values"}
    assert set(drawn) | set(skipped) == set(OPTUNA_PLOTS) and plt.get_fignums() == []
    gone = types.SimpleNamespace(study_name="missing", optuna_url=url)
    assert write_optuna_plots(gone, tmp_path)[0] == {}  # an unreadable study: notes, no exception
