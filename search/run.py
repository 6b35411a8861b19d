"""One whole search, start to finish: sweep -> results table -> best model on test -> report.

    from cxr_search.run import run_search
    summary = run_search(SearchConfig(prepared="runs/prepared", out="runs/sweep", trials=16))
    summary["best"]["metrics"]["test"]["roc_auc"]

`cxr search` and `cxr demo` call this; the steps live in tuner.py, results.py, best.py, sweep_report.py.

Only this driver reads the prepared data (`cfg.prepared`: a folder or an s3:// / gs:// / file://
URI, through `cxr_datasets.storage.Location`): train + val go into Ray's object store for the
trials, which never open PREPARED themselves, and test is read once for the best trial. The
manifest's hash is saved with the config when the sweep starts; `--resume` refuses other data.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from cxr_datasets import manifest_hash
from cxr_datasets.errors import CxrError
from cxr_model.quiet import init_tensorflow_quietly
from cxr_search.best import export_best, export_cv_best
from cxr_search.config import CONFIG_FILE, SearchConfig, write_to_storage
from cxr_search.results import collect_results, write_results
from cxr_search.shared_data import sweep_data
from cxr_search.sweep_report import write_report
from cxr_search.tracking import log_best_to_mlflow
from cxr_search.tuner import check_weights, connect, run_sweep, sweep_finished


def run_search(cfg: SearchConfig, *, resume: bool = False, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Returns {"finished", "table", "best", "report", "results_files", "wall_time_s"}, and
    "mlflow_best_run" (the MLflow run id of the best model, None without --mlflow) when finished.

    When the sweep was interrupted (Ctrl-C), only the results so far are written and "finished"
    is False: the best trial is not evaluated on test until the sweep is complete.
    """
    start = time.perf_counter()
    check_weights(cfg.weights)  # before cfg.save(): a failed start must not look like a sweep to resume
    data_hash = manifest_hash(cfg.prepared)  # CxrError naming PREPARED (folder or URI) if it is not one
    if not resume:
        # fixed now: the run folder may move, and a resume must train on the same data
        cfg = dataclasses.replace(cfg, study=cfg.study_name, prepared_hash=data_hash)
        cfg.save()
    else:
        check_same_data(cfg, data_hash)
        if not (cfg.run_dir / CONFIG_FILE).is_file():
            cfg.save()  # resumed from --storage into a new folder: keep the config here too
    # Loaded once, by a Ray task into the object store (search/shared_data.py): the trials train on
    # it and the best trial's threshold is chosen on its val split (with --cv: on its out-of-fold
    # predictions, and the folds are recorded in RUN/folds.csv).
    connect(cfg.address)
    data = sweep_data(cfg)  # train + val only; the test split stays on disk
    if cfg.cv:
        record_folds(cfg, data.get())
    grid = run_sweep(cfg, resume=resume, callbacks=callbacks, data=data)
    table, _histories = collect_results(cfg)
    files = write_results(table, cfg)
    summary: dict[str, Any] = {"finished": sweep_finished(cfg, grid), "table": table, "best": None,
                               "report": None, "results_files": files}
    if summary["finished"]:
        init_tensorflow_quietly()  # the driver's first Keras: the sweep itself needs none here
        arrays = data.get()  # mapped from the object store, not copied
        summary["best"] = export_cv_best(cfg, table, arrays) if cfg.cv else export_best(cfg, table, data=arrays)
        summary["mlflow_best_run"] = log_best_to_mlflow(cfg, summary["best"])  # None without --mlflow
        summary["wall_time_s"] = time.perf_counter() - start
        summary["report"] = write_report(cfg, table, summary["best"], wall_time_s=summary["wall_time_s"])
    summary["wall_time_s"] = time.perf_counter() - start
    return summary


def check_same_data(cfg: SearchConfig, data_hash: str) -> None:
    """A resumed sweep continues on the data its finished trials were scored on: PREPARED (a
    folder or URI) must still hold the manifest the sweep started with."""
    if cfg.prepared_hash and cfg.prepared_hash != data_hash:
        raise CxrError(f"{cfg.prepared} is not the prepared data this sweep started with (manifest.json "
                       f"sha256 {data_hash[:12]}..., the sweep's {cfg.prepared_hash[:12]}...): restore it, "
                       "or start a new sweep with another --out")


def record_folds(cfg: SearchConfig, pool) -> None:
    """RUN/folds.csv (which patient is in which fold), and its copy in a remote --storage."""
    from cxr_search.folds import FOLDS_FILE, write_folds

    path = write_folds(pool, cfg.run_dir)
    if cfg.remote_storage:
        write_to_storage(f"{cfg.storage_path}/{FOLDS_FILE}", path.read_bytes())
