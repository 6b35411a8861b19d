"""What a sweep leaves for people and tools beside Tune's own state: the Optuna study as SQLite
(RUN/optuna.db, for optuna-dashboard), the orphaned Optuna trials a killed driver leaves closed,
and MLflow (one run per trial through Ray's logger, one "best" run with the exported model).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from cxr_datasets.errors import CxrError
from cxr_search.config import SearchConfig
from cxr_search.space import METRIC

BEST_RUN_NAME = "best"


def export_study(cfg: SearchConfig) -> Path | None:
    """Copy the study of the searcher this driver ran (or restored) to RUN/optuna.db, replaced
    whole, never half-written; `run_sweep` then copies it next to the experiment with a remote
    --storage. Nothing is read from the storage: see cxr_search.study_storage. None when this
    process holds no study for the sweep (Ray Client, where the tuner runs on the cluster)."""

    import optuna

    from cxr_search.study_storage import SweepStudyStorage

    storage = SweepStudyStorage.live(cfg.experiment_path)
    if storage is None:
        return None
    target = cfg.run_dir / "optuna.db"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".optuna-") as tmp:
        staged = Path(tmp) / "optuna.db"
        optuna.copy_study(from_study_name=cfg.study_name, from_storage=storage,
                          to_storage=f"sqlite:///{staged}", to_study_name=cfg.study_name)
        os.replace(staged, target)
    return target


def study_storage(cfg: SearchConfig):
    """The Optuna storage the searcher gets: --optuna-storage's database, or a study in memory that
    Tune pickles with the experiment (see cxr_search.study_storage)."""
    import optuna

    from cxr_search.study_storage import SweepStudyStorage

    if cfg.optuna_storage:
        return optuna.storages.RDBStorage(cfg.optuna_storage)
    return SweepStudyStorage(cfg.experiment_path)


def refuse_existing_study(cfg: SearchConfig) -> None:
    """A fresh sweep must not add its trials to another sweep's study (TPE would mix them)."""
    import optuna


    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage=cfg.optuna_url)]
    if cfg.study_name in names:
        raise CxrError(f"the Optuna storage {cfg.optuna_url} already has a study {cfg.study_name!r}: "
                       "add --resume to continue that sweep, or choose another --out")


def close_orphaned_optuna_trials(cfg: SearchConfig) -> int:
    """Mark FAIL the Optuna trials still RUNNING after the sweep ended.

    When the driver is killed, a trial Optuna was asked for after Tune's last state save is
    forgotten by the restored searcher and would stay RUNNING in the study forever (and
    optuna-dashboard would show it as in progress). Only called when every Tune trial has ended.
    """
    import optuna

    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.optuna_url)
    orphans = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in orphans:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)


def mlflow_callbacks(cfg: SearchConfig) -> list:
    """Ray Tune's MLflow logger (one MLflow run per trial: its config as params, every reported
    value as metrics) when `cfg.mlflow` names a tracking URI; the experiment is the study's name."""
    if not cfg.mlflow:
        return []

    try:
        import mlflow  # noqa: F401  the optional extra: checked here for a clear message
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        raise CxrError("--mlflow needs MLflow: pip install 'cxr-tune[mlflow]'") from None
    return [MLflowLoggerCallback(tracking_uri=cfg.mlflow, experiment_name=cfg.study_name, save_artifact=False)]


def log_best_to_mlflow(cfg: SearchConfig, best: dict[str, Any]) -> str | None:
    """One MLflow run named "best" in the study's experiment, beside the trials' runs: the best
    config and threshold as params, the test metrics (test_<name>, with _ci_low/_ci_high) and the
    METRIC it won the sweep with as metrics, and the exported RUN/best folder as artifacts
    (model.keras, model_card.json, metrics.json, plots). Returns its run id; None without --mlflow.

    Ray's MLflowLoggerCallback only sees trials, so the model chosen after the sweep is logged here.
    """
    if not cfg.mlflow:
        return None
    from mlflow.tracking import MlflowClient  # the optional extra, checked by mlflow_callbacks()

    client = MlflowClient(tracking_uri=cfg.mlflow)
    experiment = client.get_experiment_by_name(cfg.study_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.study_name)
    run = client.create_run(experiment_id, run_name=BEST_RUN_NAME,
                            tags={"cxr.trial_id": str(best["trial_id"]), "cxr.run_dir": str(cfg.run_dir)})
    run_id = run.info.run_id
    try:
        params = {**{k: v for k, v in best["params"].items() if v is not None},
                  "threshold": best["threshold"], "threshold_method": best["threshold_method"],
                  "best_epoch": best["best_epoch"]}
        for key, value in params.items():
            client.log_param(run_id, key, value)
        for key, value in _test_metrics(best["metrics"]["test"]).items():
            client.log_metric(run_id, key, value)
        client.log_metric(run_id, f"{METRIC}_in_sweep", float(best[METRIC]))
        client.log_artifacts(run_id, str(best["model_dir"]))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def _test_metrics(test: dict[str, Any]) -> dict[str, float]:
    """test_<name> (and _ci_low, _ci_high) for every metric with a finite value."""
    out = {}
    for name, entry in test.items():
        if not (isinstance(entry, dict) and "value" in entry):
            continue
        for part, key in (("value", f"test_{name}"), ("ci_low", f"test_{name}_ci_low"),
                          ("ci_high", f"test_{name}_ci_high")):
            value = entry.get(part)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[key] = float(value)
    return out
