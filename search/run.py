"""One whole search, start to finish: sweep -> results table -> best model on test -> report.

    from cxr_search.run import run_search
    summary = run_search(SearchConfig(prepared="runs/prepared", out="runs/sweep", trials=16))
    summary["best"]["metrics"]["test"]["roc_auc"]

`cxr search` and `cxr demo` call this; the steps live in tuner.py, results.py, best.py, sweep_report.py.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from cxr_model import Data
from cxr_search.best import export_best
from cxr_search.config import CONFIG_FILE, SearchConfig
from cxr_search.results import collect_results, write_results
from cxr_search.sweep_report import write_report
from cxr_search.tuner import check_weights, log_best_to_mlflow, run_sweep, sweep_finished


def run_search(cfg: SearchConfig, *, resume: bool = False, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Returns {"finished", "table", "best", "report", "results_files", "wall_time_s"}, and
    "mlflow_best_run" (the MLflow run id of the best model, None without --mlflow) when finished.

    When the sweep was interrupted (Ctrl-C), only the results so far are written and "finished"
    is False: the best trial is not evaluated on test until the sweep is complete.
    """
    start = time.perf_counter()
    check_weights(cfg.weights)  # before cfg.save(): a failed start must not look like a sweep to resume
    if not resume:
        cfg = dataclasses.replace(cfg, study=cfg.study_name)  # fixed now: the run folder may move
        cfg.save()
    elif not (cfg.run_dir / CONFIG_FILE).is_file():
        cfg.save()  # resumed from --storage into a new folder: keep the config here too
    # Loaded once: the trials train on it and the best trial's threshold is chosen on its val split.
    data = Data.from_prepared(cfg.prepared)  # train + val only; the test split stays on disk
    grid = run_sweep(cfg, resume=resume, callbacks=callbacks, data=data)
    table, _histories = collect_results(cfg)
    files = write_results(table, cfg)
    summary: dict[str, Any] = {"finished": sweep_finished(cfg, grid), "table": table, "best": None,
                               "report": None, "results_files": files}
    if summary["finished"]:
        summary["best"] = export_best(cfg, table, data=data)
        summary["mlflow_best_run"] = log_best_to_mlflow(cfg, summary["best"])  # None without --mlflow
        summary["wall_time_s"] = time.perf_counter() - start
        summary["report"] = write_report(cfg, table, summary["best"], wall_time_s=summary["wall_time_s"])
    summary["wall_time_s"] = time.perf_counter() - start
    return summary
