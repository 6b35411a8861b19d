"""The sweep: Ray Tune's Tuner with Optuna's TPE under a concurrency limit, ASHA on epochs, one
checkpoint per trial, and resume after an interrupted driver, also on a new head from the storage.

    cfg = SearchConfig(prepared="runs/prepared", out="runs/sweep", trials=16, max_epochs=10)
    grid = run_sweep(cfg)                 # a fresh sweep
    grid = run_sweep(cfg, resume=True)    # continue runs/sweep after Ctrl-C or kill -9

Where things go (storage = --storage, default: the run folder):
    storage/tune/                 Tune's experiment state, the searcher with its Optuna study
                                  (searcher-state-*.pkl), trial folders, checkpoints
    storage/search_config.json    the sweep's settings (what `--resume --storage URI` starts from)
    RUN/optuna.db                 a SQLite copy of the study (`optuna-dashboard sqlite:///RUN/optuna.db`),
                                  also in storage/ when that is a URI; or --optuna-storage URL
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

from cxr_datasets.errors import CxrError, first_line
from cxr_model.quiet import init_tensorflow_quietly
from cxr_search.config import SearchConfig, write_to_storage
from cxr_search.folds import CV_BUDGET, FOLDS_DONE
from cxr_search.shared_data import SharedData, share, sweep_data
from cxr_search.space import METRIC, MODE, SpaceSampler
from cxr_search.tracking import (
    close_orphaned_optuna_trials,
    export_study,
    mlflow_callbacks,
    refuse_existing_study,
    study_storage,
)

# Fraction of a GPU per trial when the cluster has GPUs and --gpus-per-trial is not given: a
# frozen-base VGG16 trial uses a fraction of an H100, so four share one.
DEFAULT_GPU_SHARE = 0.25


def run_sweep(cfg: SearchConfig, *, resume: bool = False, callbacks: Sequence[Any] = (), data=None):
    """Run (or continue) the sweep described by `cfg`; returns Tune's ResultGrid.

    callbacks: extra `ray.tune.Callback`s (tests use one to kill a trial's worker).
    data: the `SharedData` of `sweep_data(cfg)` (run_search loads it first), or a `cxr_model.Data`
    to train on instead of `cfg.prepared` (benchmarks); by default `cfg.prepared` is loaded here.
    """
    # With num_to_keep=1 every checkpoint forces a snapshot of the (small) experiment state, by
    # design here (one best checkpoint per trial); Tune would warn about it at every epoch.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    check_weights(cfg.weights)
    connect(cfg.address)
    if data is None:
        data = sweep_data(cfg)
    elif not isinstance(data, SharedData):
        data = share(data)
    trainable = build_trainable(cfg, data)
    gpu_check = gpu_check_callback()
    callbacks = [*callbacks, gpu_check, drop_optimizer_state_callback()]
    tuner = restored_tuner(cfg, trainable, callbacks) if resume else new_tuner(cfg, trainable, callbacks)
    try:
        grid = _fit_keeping_sigint(tuner)
    except Exception:
        if gpu_check.line:  # the sweep was stopped on purpose: say why in one line

            raise CxrError(gpu_check.line) from None
        raise
    exported = None if cfg.optuna_storage else export_study(cfg)
    if sweep_finished(cfg, grid):
        close_orphaned_optuna_trials(cfg)
    if exported is not None and cfg.remote_storage:
        # after the orphans are closed: the storage's copy says what RUN/optuna.db says

        write_to_storage(f"{cfg.storage_path}/optuna.db", exported.read_bytes())
    return grid


def check_weights(weights: str | None) -> None:
    """Fail before any trial starts when the VGG16 weights cannot be had: offline without a cached
    ImageNet file, or a weights file that does not exist. Otherwise every trial would fail (and be
    retried) with the one-line reason buried in its log. For "imagenet" this also downloads the
    file once here, under the same file lock, so that local trials find it in Keras's cache."""
    if weights is None:
        return
    init_tensorflow_quietly()  # `cxr search` starts TensorFlow only where its driver needs Keras
    from cxr_model.model import resolve_weights

    resolve_weights(weights)  # CxrError with one clear line


def _fit_keeping_sigint(tuner):
    """tuner.fit(), with Ctrl-C working again afterwards: Tune leaves its own SIGINT handler
    installed after a sweep, which would swallow a Ctrl-C during the final evaluation."""

    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    handler = signal.getsignal(signal.SIGINT)
    try:
        return tuner.fit()
    finally:
        signal.signal(signal.SIGINT, handler)


def new_tuner(cfg: SearchConfig, trainable, callbacks: Sequence[Any] = ()):
    from ray import tune


    if tune.Tuner.can_restore(cfg.experiment_path):
        raise CxrError(f"{cfg.experiment_path} already holds a sweep: add --resume to continue it, "
                       "or choose another --out/--storage")
    if cfg.optuna_storage:
        refuse_existing_study(cfg)
    return tune.Tuner(trainable, tune_config=build_tune_config(cfg), run_config=build_run_config(cfg, callbacks))


def restored_tuner(cfg: SearchConfig, trainable, callbacks: Sequence[Any] = ()):
    """The interrupted sweep, as Tune saved it: finished trials are kept as they are, interrupted
    ones continue from their checkpoints, errored ones get another chance (the cause may have been
    a lost node). The searcher (TPE and its trials so far) is restored with it, so the search goes
    on where it stopped and the requested number of trials is reached, not exceeded."""
    from ray import tune


    if not tune.Tuner.can_restore(cfg.experiment_path):
        raise CxrError(f"nothing to resume at {cfg.experiment_path}: run without --resume first")
    # The trainable is passed again: it carries this driver's object-store reference to the data.
    with _quiet_unreported_trials():
        tuner = tune.Tuner.restore(cfg.experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    # The saved run config holds a DriverCallbacks, which forwards to this driver's own callbacks
    # (the same set a new sweep gets, MLflow's logger included), not the interrupted driver's.
    _run_callbacks(cfg, callbacks)
    return tuner


class _DropUnreportedTrialWarning:
    """Tuner.restore reads the results of every saved trial into an ExperimentAnalysis of the
    interrupted state (fit() replaces it). A trial that had started but not reported when the
    driver died has no result file yet, and Tune warns "Failed to fetch metrics ...
    FileNotFoundError(... result.json and progress.csv were not found)" although nothing is lost:
    the trial simply runs again. Only that warning is dropped, and only while restoring."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        if not message.startswith("Failed to fetch metrics"):
            return True
        failures = message.splitlines()[1:]
        return not failures or not all("FileNotFoundError(" in line for line in failures)


@contextlib.contextmanager
def _quiet_unreported_trials():
    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    dropper = _DropUnreportedTrialWarning()
    log.addFilter(dropper)
    try:
        yield
    finally:
        log.removeFilter(dropper)


def gpu_check_callback():
    """A Tune callback that stops the sweep at the first trial failing the GPU check.

    Such a failure is the node's software, not bad luck: a retry (max_failures) would fail the
    same way, as would every later trial. Raising from the callback ends tuner.fit() at once with
    the experiment state saved as after a killed driver, so `--resume` continues once the nodes
    are fixed. The trial's line is kept in `.line` for the driver's error message.
    """
    from ray import tune

    from cxr_search.trainable import GPU_CHECK_FAILED

    class StopOnGpuCheck(tune.Callback):
        line: str | None = None

        def _check(self, trial) -> None:
            # The driver's own copy of the error: the one in storage is only synced later.
            path = trial.error_file
            error = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
            lines = [line.strip() for line in error.splitlines() if GPU_CHECK_FAILED in line]
            if lines:
                # "...GpuNotVisible: GPU check failed: ..." -> from the marker on
                self.line = lines[-1][lines[-1].index(GPU_CHECK_FAILED):]
                raise RuntimeError(self.line)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._check(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._check(trial)

    return StopOnGpuCheck()


def drop_optimizer_state_callback():
    """A `tune.Callback` that deletes optimizer.npz from a trial's checkpoint once the trial has
    ended (its last epoch, or stopped by ASHA). The optimizer's state is what a retry of a running
    trial needs to go on exactly; nothing reads it after the trial ended (the export takes the
    weights), and for a fine-tuned trial it is twice its trainable weights (Adam's two moments:
    ~100 of a ~150 MB checkpoint at 32 px with blocks 4-5 trainable). An errored trial keeps it:
    `--resume` retries it from that checkpoint."""
    from ray import tune

    from cxr_search.checkpoint import OPTIMIZER_FILE

    class DropOptimizerState(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            checkpoint = trial.checkpoint
            if checkpoint is None:
                return
            path = f"{checkpoint.path.rstrip('/')}/{OPTIMIZER_FILE}"
            if checkpoint.filesystem.get_file_info(path).is_file:
                checkpoint.filesystem.delete_file(path)

    return DropOptimizerState()


def sweep_finished(cfg: SearchConfig, grid) -> bool:
    """False when the sweep was interrupted (Ctrl-C): fewer trials ended than were requested. A
    trial ended when it errored or reported its metric: one that Ctrl-C stopped before its first
    report counts as terminated in the grid, while Tune saved it as running (`--resume` runs it)."""
    ended = sum(1 for result in grid if result.error is not None or METRIC in (result.metrics or {}))
    return ended >= cfg.trials


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray; keep a connection that already exists."""
    import ray


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
    """The trainable with the data's object-store reference and the trial's resources attached.
    `data`: a `SharedData` (search/shared_data.py)."""
    from ray import tune

    from cxr_search.trainable import train_trial, trial_settings

    resources = trial_resources(cfg)
    settings = trial_settings(
        image_size=data.image_size, weights=cfg.weights, max_epochs=cfg.max_epochs, seed=cfg.seed,
        patience=cfg.patience, cpus_per_trial=resources["cpu"], gpus_per_trial=resources["gpu"],
        feature_cache_dir=cfg.feature_cache_dir, use_feature_cache=cfg.feature_cache, cv=cfg.cv,
    )
    # with_parameters hands every trial the reference (not the arrays); each trial on a node maps
    # the same arrays read-only (zero-copy numpy views), instead of unpickling its own copy.
    return tune.with_resources(tune.with_parameters(train_trial, data=data, settings=settings), resources)


def build_searcher(cfg: SearchConfig):
    """Optuna TPE (seeded) on the define-by-run space, its study in `cfg.optuna_url`, at most
    `cfg.concurrency` trials suggested before their results are in; `cfg.points_to_evaluate`, if
    any, are the first trials."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # No --optuna-storage: the study lives in memory inside the searcher, and Tune pickles the
    # searcher into the experiment folder (searcher-state-*.pkl) with every experiment snapshot and
    # syncs it to --storage with the trials' state. So it is wherever the storage is (a folder,
    # NFS, s3://, gs://), a new head restores it with the sweep, and it always matches Tune's
    # trials (a study in a separate file would run ahead of a killed driver's last snapshot).
    # RUN/optuna.db is a SQLite copy for optuna-dashboard, written after the sweep from the study
    # this driver holds (cxr_search.tracking.export_study), never from a file in the storage.
    searcher = OptunaSearch(
        SpaceSampler(cfg.space), metric=METRIC, mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        storage=study_storage(cfg), study_name=cfg.study_name,
        # enqueued in the study, so exactly these run first, whatever the sampler's seed
        points_to_evaluate=[dict(point) for point in cfg.points_to_evaluate] or None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.concurrency)


def build_scheduler(cfg: SearchConfig):
    from ray.tune.schedulers import ASHAScheduler

    # metric and mode come from TuneConfig (named there so Tune's status shows the best trial)
    if cfg.cv:
        # The budget is fold 1's epochs, then max_epochs per completed fold (search/cv_trial.py):
        # the rungs below max_epochs judge fold 1 epoch by epoch, as without --cv, so a poor
        # configuration costs what it costs there; later rungs judge the mean of the folds done.
        return ASHAScheduler(time_attr=CV_BUDGET, max_t=cfg.cv * cfg.max_epochs,
                             grace_period=min(cfg.grace_period, cfg.max_epochs),
                             reduction_factor=cfg.reduction_factor)
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
        # With --cv each checkpoint holds every fold done so far and its METRIC (the mean so far)
        # may fall: the one kept is the one with most folds.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=FOLDS_DONE if cfg.cv
                                                else METRIC, checkpoint_score_order="max" if cfg.cv else MODE),
        verbose=cfg.verbose,
        callbacks=_run_callbacks(cfg, callbacks),
    )


def trial_dirname(trial) -> str:
    # Tune's default folder name spells out every parameter; the id is enough (params are in results).
    return f"trial_{trial.trial_id}"


def _run_callbacks(cfg: SearchConfig, callbacks) -> list | None:
    """The driver's callbacks plus, with --mlflow, MLflow's logger, for a new sweep and a restored
    one alike: set as this driver's (search/ray_adapter.py); the run config gets their forwarder."""
    from cxr_search.ray_adapter import DriverCallbacks

    return DriverCallbacks.use([*callbacks, *mlflow_callbacks(cfg)]) or None
