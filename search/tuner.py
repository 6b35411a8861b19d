"""The sweep: Ray Tune's Tuner with Optuna's TPE (persisted in SQLite) under a concurrency limit,
ASHA on epochs, one checkpoint per trial, and resume after an interrupted driver.

    cfg = SearchConfig(prepared="runs/prepared", out="runs/sweep", trials=16, max_epochs=10)
    grid = run_sweep(cfg)                 # a fresh sweep
    grid = run_sweep(cfg, resume=True)    # continue runs/sweep after Ctrl-C or kill -9

Where things go (storage = --storage, default: the run folder):
    storage/tune/                 Tune's experiment state, searcher state, trial folders, checkpoints
    RUN/optuna.db                 the Optuna study (`optuna-dashboard sqlite:///RUN/optuna.db`)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from search.config import SearchConfig
from search.space import METRIC, MODE, SpaceSampler

# Fraction of a GPU per trial when the cluster has GPUs and --gpus-per-trial is not given: a
# frozen-base VGG16 trial uses a fraction of an H100, so four share one.
DEFAULT_GPU_SHARE = 0.25


def run_sweep(cfg: SearchConfig, *, resume: bool = False, callbacks: Sequence[Any] = (), data=None):
    """Run (or continue) the sweep described by `cfg`; returns Tune's ResultGrid.

    callbacks: extra `ray.tune.Callback`s (tests use one to kill a trial's worker).
    data: a `cxr_model.Data` to train on instead of loading `cfg.prepared` (run_search, benchmarks).
    """
    from cxr_model import Data

    # With num_to_keep=1 every checkpoint forces a snapshot of the (small) experiment state, by
    # design here (one best checkpoint per trial); Tune would warn about it at every epoch.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    check_weights(cfg.weights)
    connect(cfg.address)
    if data is None:
        data = Data.from_prepared(cfg.prepared)  # train + val only; the test split stays on disk
    trainable = build_trainable(cfg, data)
    tuner = restored_tuner(cfg, trainable) if resume else new_tuner(cfg, trainable, callbacks)
    grid = _fit_keeping_sigint(tuner)
    if sweep_finished(cfg, grid):
        close_orphaned_optuna_trials(cfg)
    return grid


def check_weights(weights: str | None) -> None:
    """Fail before any trial starts when the VGG16 weights cannot be had: offline without a cached
    ImageNet file, or a weights file that does not exist. Otherwise every trial would fail (and be
    retried) with the one-line reason buried in its log. For "imagenet" this also downloads the
    file once here, under the same file lock, so that local trials find it in Keras's cache."""
    if weights is None:
        return
    from cxr_model.model import resolve_weights

    resolve_weights(weights)  # CxrError with one clear line


def _fit_keeping_sigint(tuner):
    """tuner.fit(), with Ctrl-C working again afterwards: Tune leaves its own SIGINT handler
    installed after a sweep, which would swallow a Ctrl-C during the final evaluation."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    handler = signal.getsignal(signal.SIGINT)
    try:
        return tuner.fit()
    finally:
        signal.signal(signal.SIGINT, handler)


def new_tuner(cfg: SearchConfig, trainable, callbacks: Sequence[Any] = ()):
    from ray import tune

    from datasets.errors import CxrError

    if tune.Tuner.can_restore(cfg.experiment_path):
        raise CxrError(f"{cfg.experiment_path} already holds a sweep: add --resume to continue it, "
                       "or choose another --out/--storage")
    _refuse_existing_study(cfg)
    return tune.Tuner(trainable, tune_config=build_tune_config(cfg), run_config=build_run_config(cfg, callbacks))


def restored_tuner(cfg: SearchConfig, trainable):
    """The interrupted sweep, as Tune saved it: finished trials are kept as they are, interrupted
    ones continue from their checkpoints, errored ones get another chance (the cause may have been
    a lost node). The searcher (TPE and its trials so far) is restored with it, so the search goes
    on where it stopped and the requested number of trials is reached, not exceeded."""
    from ray import tune

    from datasets.errors import CxrError

    if not tune.Tuner.can_restore(cfg.experiment_path):
        raise CxrError(f"nothing to resume at {cfg.experiment_path}: run without --resume first")
    # The trainable is passed again: it carries this driver's object-store reference to the data.
    return tune.Tuner.restore(cfg.experiment_path, trainable=trainable, resume_unfinished=True,
                              resume_errored=True)


def sweep_finished(cfg: SearchConfig, grid) -> bool:
    """False when the sweep was interrupted (Ctrl-C): fewer trials ended than were requested."""
    return grid.num_terminated + grid.num_errors >= cfg.trials


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray; keep a connection that already exists."""
    import ray

    from datasets.errors import CxrError, first_line

    if ray.is_initialized():
        return
    if not address:
        ray.init()
        return
    try:
        ray.init(address=address)
    except ConnectionError as exc:
        raise CxrError(f"no Ray cluster at {address} ({first_line(exc, limit=120)}); start one with "
                       "`ray up cluster.yaml` or `ray start --head`, or leave out --address") from None


def trial_resources(cfg: SearchConfig) -> dict[str, float]:
    """CPUs and GPUs per trial; the GPU share defaults to 0.25 where the cluster has GPUs, else 0."""
    import ray

    gpus = cfg.gpus_per_trial
    if gpus is None:
        gpus = DEFAULT_GPU_SHARE if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": cfg.cpus_per_trial, "gpu": gpus}


def build_trainable(cfg: SearchConfig, data):
    """The trainable with the data in Ray's object store and the trial's resources attached."""
    from ray import tune

    from search.trainable import train_trial, trial_settings

    resources = trial_resources(cfg)
    settings = trial_settings(
        image_size=data.image_size, weights=cfg.weights, max_epochs=cfg.max_epochs, seed=cfg.seed,
        patience=cfg.patience, cpus_per_trial=resources["cpu"], gpus_per_trial=resources["gpu"],
        feature_cache_dir=cfg.feature_cache_dir, use_feature_cache=cfg.feature_cache,
    )
    # with_parameters puts `data` into the object store once; every trial on a node maps the same
    # arrays read-only (zero-copy numpy views), instead of each trial pickling its own copy.
    return tune.with_resources(tune.with_parameters(train_trial, data=data, settings=settings), resources)


def build_searcher(cfg: SearchConfig):
    """Optuna TPE (seeded) on the define-by-run space, its study in `cfg.optuna_url`, at most
    `cfg.concurrency` trials suggested before their results are in."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.RDBStorage(cfg.optuna_url)
    searcher = OptunaSearch(
        SpaceSampler(cfg.space), metric=METRIC, mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        storage=storage, study_name=cfg.study_name,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.concurrency)


def build_scheduler(cfg: SearchConfig):
    from ray.tune.schedulers import ASHAScheduler

    # metric and mode come from TuneConfig (named there so Tune's status shows the best trial)
    return ASHAScheduler(
        time_attr="training_iteration",  # one iteration = one epoch
        max_t=cfg.max_epochs, grace_period=min(cfg.grace_period, cfg.max_epochs),
        reduction_factor=cfg.reduction_factor,
    )


def build_tune_config(cfg: SearchConfig):
    from ray import tune

    return tune.TuneConfig(
        metric=METRIC, mode=MODE,
        search_alg=build_searcher(cfg), scheduler=build_scheduler(cfg) if cfg.asha else None,
        num_samples=cfg.trials,
        # Keep trial processes: the next trial skips importing Keras and starting the backend
        # (~20 s per trial on the GPU machine against ~0.25 s per epoch) and finds the features.
        reuse_actors=True,
        trial_dirname_creator=trial_dirname,
    )


def build_run_config(cfg: SearchConfig, callbacks: Sequence[Any] = ()):
    from ray import tune

    return tune.RunConfig(
        name=Path(cfg.experiment_path).name,
        storage_path=cfg.storage_path,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        # One checkpoint per trial: trials only checkpoint when val AUC improved (see
        # search/trial_reporter.py), so the one kept is the trial's best.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                                checkpoint_score_order=MODE),
        verbose=cfg.verbose,
        callbacks=[*callbacks, *mlflow_callbacks(cfg)] or None,
    )


def trial_dirname(trial) -> str:
    # Tune's default folder name spells out every parameter; the id is enough (params are in results).
    return f"trial_{trial.trial_id}"


def _refuse_existing_study(cfg: SearchConfig) -> None:
    """A fresh sweep must not add its trials to another sweep's study (TPE would mix them)."""
    import optuna

    from datasets.errors import CxrError

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
    from datasets.errors import CxrError

    try:
        import mlflow  # noqa: F401  the optional extra: checked here for a clear message
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        raise CxrError("--mlflow needs MLflow: pip install 'cxr-tune[mlflow]'") from None
    return [MLflowLoggerCallback(tracking_uri=cfg.mlflow, experiment_name=cfg.study_name, save_artifact=False)]
