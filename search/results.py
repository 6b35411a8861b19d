"""The results table: one row per trial, read back from the experiment in storage.

Columns: trial_id, status, one per hyperparameter of search/space.py (`head_units` spelled
"512-128"), `val_auc` (space.METRIC: the trial's best validation AUC, the optimised metric),
best_epoch, epochs_run, stopped_by (max_epochs | asha | patience | error | unfinished),
stopped_early, duration_s, node_id, n_nodes, feature_cache, attempts (1 + retries after a dead
worker), checkpoint, error, and the validation AUC of every epoch, `val_auc_e1` ... `val_auc_eN`,
so trials stopped at different budgets can be compared at the same budget.

With `--cv K` a trial reports every epoch of fold 1, then once per fold, and its row says so:
`val_auc` is the mean of its completed folds' best validation AUCs (fold 1's best so far for a
trial ASHA stopped inside fold 1) and `cv_se` its standard error, `folds_done` (K, or fewer for a
trial ASHA stopped: 0 inside fold 1), `val_auc_f1` ... `val_auc_fK` per fold, `fold_best_epochs`
("3-5-4"), `best_epoch` their median (what `--refit` trains for), `epochs_run` the epochs of all its folds
together, and stopped_by `folds` (all K) or `asha`. Complete trials are listed first: only they
can be exported (the ensemble needs every fold), then the rest by their partial mean.

Written as RUN/results.parquet and RUN/results.csv, and next to Tune's experiment state when
--storage is elsewhere (s3://...).
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pandas as pd

from cxr_search.config import SearchConfig, write_to_storage
from cxr_search.folds import FOLDS_DONE
from cxr_search.space import EPOCH_METRIC, METRIC, MODE, param_columns

EPOCH_PREFIX = f"{METRIC}_e"  # METRIC of epoch N is the column f"{EPOCH_PREFIX}{N}"
FOLD_PREFIX = f"{METRIC}_f"   # with --cv: the best METRIC of fold N is the column f"{FOLD_PREFIX}{N}"


def collect_results(cfg: SearchConfig) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(results table, {trial_id: per-epoch frame}) of the sweep in `cfg.experiment_path`."""
    from ray.tune import ExperimentAnalysis  # Ray: seconds to import; `cxr --help` must not pay it

    analysis = ExperimentAnalysis(cfg.experiment_path)
    frames = analysis.trial_dataframes  # {trial_id: all reported rows}
    rows, histories = [], {}
    for trial in analysis.trials:
        if cfg.cv:
            reports = fold_frame(frames.get(trial.trial_id))
            histories[trial.trial_id] = reports
            rows.append(cv_trial_row(trial, reports, cfg))
            continue
        epochs = epoch_frame(frames.get(trial.trial_id))
        histories[trial.trial_id] = epochs
        rows.append(trial_row(trial, epochs, cfg))
    table = pd.DataFrame(rows)
    if not table.empty:
        ascending = MODE == "min"
        if cfg.cv:  # complete cross-validations first, then by (partial) mean
            table = table.assign(_complete=table[FOLDS_DONE] >= cfg.cv)
            table = table.sort_values(["_complete", METRIC], ascending=[False, ascending], na_position="last",
                                      kind="stable").drop(columns="_complete")
        else:
            table = table.sort_values(METRIC, ascending=ascending, na_position="last", kind="stable")
    return table.reset_index(drop=True), histories


def fold_frame(frame: pd.DataFrame | None) -> pd.DataFrame:
    """A CV trial's reports: one row per completed fold (a retry may re-report a fold: the last
    is kept); a trial stopped inside fold 1 keeps its last per-epoch row (folds_done 0)."""
    if frame is None or frame.empty or FOLDS_DONE not in frame:
        return pd.DataFrame()
    frame = frame.dropna(subset=[FOLDS_DONE]).copy()
    frame[FOLDS_DONE] = frame[FOLDS_DONE].astype(int)
    folds = frame[frame[FOLDS_DONE] > 0]
    if folds.empty:
        return frame.tail(1).reset_index(drop=True)
    return folds.drop_duplicates(FOLDS_DONE, keep="last").sort_values(FOLDS_DONE).reset_index(drop=True)


def cv_trial_row(trial, folds: pd.DataFrame, cfg: SearchConfig) -> dict[str, Any]:
    """A CV trial's row: see the module docstring."""
    row: dict[str, Any] = {"trial_id": trial.trial_id, "status": trial.status}
    row.update(param_columns(dict(trial.config)))
    last = folds.iloc[-1] if len(folds) else None
    row[METRIC] = float(last[METRIC]) if last is not None else math.nan
    row["cv_se"] = float(last["cv_se"]) if last is not None else math.nan
    row[FOLDS_DONE] = int(last[FOLDS_DONE]) if last is not None else 0
    done = folds[folds[FOLDS_DONE] > 0] if last is not None else folds
    best_epochs = [int(e) for e in done["fold_best_epoch"]] if len(done) else []
    row["fold_best_epochs"] = "-".join(str(e) for e in best_epochs)
    row["best_epoch"] = int(np.median(best_epochs)) if best_epochs else int(last["fold_best_epoch"]) \
        if last is not None else 0
    row["epochs_run"] = int(last["epoch"]) if last is not None else 0
    if trial.status == "ERROR":
        row["stopped_by"] = "error"
    elif trial.status != "TERMINATED" or last is None:
        row["stopped_by"] = "unfinished"
    else:
        row["stopped_by"] = "folds" if row[FOLDS_DONE] >= cfg.cv else "asha"
    row["stopped_early"] = row["stopped_by"] == "asha"
    # time_this_iter_s: since the previous report, fold 1's epochs included
    row["duration_s"] = float(last["time_total_s"]) if last is not None and "time_total_s" in last else math.nan
    row.update(_run_columns(trial, folds, last))
    for _, fold in done.iterrows():
        row[f"{FOLD_PREFIX}{int(fold[FOLDS_DONE])}"] = float(fold["fold_val_auc"])
    return row


def _run_columns(trial, reports: pd.DataFrame, last) -> dict[str, Any]:
    """Where and how a trial ran, from its reports (epochs or folds) and the last of them."""
    nodes = list(dict.fromkeys(reports["node_id"].dropna())) if "node_id" in reports else []
    return {
        "node_id": nodes[-1] if nodes else None,
        "n_nodes": len(nodes),
        "node_ip": str(last["node_ip"]) if last is not None and "node_ip" in last else None,
        "feature_cache": bool(last["feature_cache"]) if last is not None else None,
        "attempts": 1 + int(trial.num_failures),
        "checkpoint": checkpoint_uri(trial.checkpoint),
        "error": _error_line(trial),
    }


def epoch_frame(frame: pd.DataFrame | None) -> pd.DataFrame:
    """One row per epoch; a retried trial re-reports epochs after its checkpoint: keep the last."""
    if frame is None or frame.empty or "epoch" not in frame:
        return pd.DataFrame()
    frame = frame.dropna(subset=["epoch"]).copy()
    frame["epoch"] = frame["epoch"].astype(int)
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


def trial_row(trial, epochs: pd.DataFrame, cfg: SearchConfig) -> dict[str, Any]:
    params = dict(trial.config)
    row: dict[str, Any] = {"trial_id": trial.trial_id, "status": trial.status}
    row.update(param_columns(params))
    last = epochs.iloc[-1] if len(epochs) else None
    row[METRIC] = float(last[METRIC]) if last is not None else math.nan
    row["best_epoch"] = int(last["best_epoch"]) if last is not None else 0
    row["epochs_run"] = int(last["epoch"]) if last is not None else 0
    row["stopped_by"] = stopped_by(trial.status, last, cfg)
    row["stopped_early"] = row["stopped_by"] in ("asha", "patience")
    row["duration_s"] = float(epochs["time_this_iter_s"].sum()) if "time_this_iter_s" in epochs else math.nan
    row.update(_run_columns(trial, epochs, last))
    for _, epoch in epochs.iterrows():
        row[f"{EPOCH_PREFIX}{int(epoch['epoch'])}"] = float(epoch.get(EPOCH_METRIC, math.nan))
    return row


def checkpoint_uri(checkpoint) -> str | None:
    """Where a trial's checkpoint is, as a path or an s3:// / gs:// URI that `tune.Checkpoint`
    (and anyone reading results.csv) can open without knowing the storage's filesystem."""
    if checkpoint is None:
        return None
    scheme = {"s3": "s3://", "gcs": "gs://", "hdfs": "hdfs://"}.get(checkpoint.filesystem.type_name, "")
    return scheme + checkpoint.path


def stopped_by(status: str, last, cfg: SearchConfig) -> str:
    """Why a trial ended. ASHA does not tag its decisions, but it is the only other way a trial
    ends before max_epochs without an error once fit's own patience is ruled out."""
    if status == "ERROR":
        return "error"
    if status != "TERMINATED" or last is None:
        return "unfinished"
    if int(last["epoch"]) >= cfg.max_epochs:
        return "max_epochs"
    if int(last["epochs_since_best"]) >= cfg.patience:
        return "patience"
    return "asha"


def _error_line(trial) -> str | None:
    if trial.status != "ERROR":
        return None
    message = trial.get_error() or ""
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "error"


def epoch_columns(table: pd.DataFrame) -> list[str]:
    cols = [c for c in table.columns if c.startswith(EPOCH_PREFIX) and c[len(EPOCH_PREFIX):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(EPOCH_PREFIX):]))


def fold_columns(table: pd.DataFrame) -> list[str]:
    cols = [c for c in table.columns if c.startswith(FOLD_PREFIX) and c[len(FOLD_PREFIX):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(FOLD_PREFIX):]))


def write_results(table: pd.DataFrame, cfg: SearchConfig) -> list[str]:
    """RUN/results.{parquet,csv}; also beside the experiment when storage is remote."""
    epochs = epoch_columns(table)
    table = table[[c for c in table.columns if c not in epochs] + epochs]
    written = []
    for name, data in (("results.parquet", _parquet_bytes(table)), ("results.csv", table.to_csv(index=False).encode())):
        path = cfg.run_dir / name
        path.write_bytes(data)
        written.append(str(path))
        if cfg.remote_storage:
            written.append(write_to_storage(f"{cfg.storage_path}/{name}", data))
    return written


def _parquet_bytes(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return buffer.getvalue()
