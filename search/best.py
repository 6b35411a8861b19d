"""The best trial: chosen on validation, rebuilt from its checkpoint, scored ONCE on test, exported.

Why from the checkpoint and not by retraining its config: the checkpoint holds exactly the weights
whose validation AUC won the sweep (each trial checkpoints only its best epoch), so the model we
export is the model we selected. A retrain would cost another full run and, with nondeterministic
GPU kernels, land on a different model whose validation score nobody looked at. The threshold,
the test evaluation and the export are `cxr_model.finalize.finalize`, the same code `cxr train`
uses, so a searched model and a trained one are exported and reported identically.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_datasets.errors import CxrError
from cxr_model import TrainConfig
from cxr_model.evaluate import metrics_from_probs
from cxr_model.finalize import finalize
from cxr_search.checkpoint import STATE_FILE, WEIGHTS_FILE, fold_dir, load_weights
from cxr_search.config import SearchConfig
from cxr_search.space import METRIC, MODE, result_params

BEST_DIR = "best"


def best_row(table: pd.DataFrame) -> pd.Series:
    """The finished trial with the best validation metric (ties: the earlier trial)."""
    done = table[(table["status"] == "TERMINATED") & table[METRIC].notna() & table["checkpoint"].notna()]
    if done.empty:
        raise CxrError("no trial finished with a validation score: see the trials' errors in results.csv")
    index = done[METRIC].idxmax() if MODE == "max" else done[METRIC].idxmin()
    return done.loc[index]


def load_checkpoint(checkpoint_path: str) -> tuple[Any, dict, Any]:
    """(model, state, TrainConfig) from a trial checkpoint, local or in s3:// / gs:// storage."""
    from ray import tune  # Ray: seconds to import; only this step of `cxr search` needs it here

    folder = Path(tune.Checkpoint(checkpoint_path).to_directory())
    state = json.loads((folder / STATE_FILE).read_text())
    train_cfg = TrainConfig.from_dict(state["train_config"])
    model = _model_with_weights(train_cfg, folder / WEIGHTS_FILE)
    return model, state, train_cfg


def _model_with_weights(train_cfg, weights_path: Path):
    """The full model (raw uint8 image in, probabilities out) carrying the checkpoint's weights."""
    from cxr_model.model import build_model  # Keras (and its backend): loaded when a model is built

    # Trials checkpoint the full model, also when they trained the head on cached features. The
    # seed matters with weights=None: it fixes the random base the head was trained on.
    model = build_model(train_cfg.model, seed=train_cfg.seed)
    load_weights(model, weights_path)
    return model


def export_best(cfg: SearchConfig, table: pd.DataFrame, data=None) -> dict[str, Any]:
    """Evaluate the best trial once on test (threshold from validation) and export RUN/best/.

    Returns cxr_model.finalize.finalize()'s dict plus the trial's id, parameters and METRIC in the sweep.
    """
    row = best_row(table)
    model, state, trial_cfg = load_checkpoint(row["checkpoint"])
    # The card records what was trained: the trial's config, up to its best (checkpointed) epoch.
    train_cfg = dataclasses.replace(trial_cfg, epochs=int(state["epoch"]))
    val = (data.x_val, data.y_val) if data is not None else None
    result = finalize(
        model, train_cfg, cfg.prepared, cfg.run_dir / BEST_DIR, history=state["history"], val=val,
        threshold_method=cfg.threshold_method, n_boot=cfg.n_boot, overwrite=True, formats=cfg.formats,
        extra={"search": {"run_dir": str(cfg.run_dir), "trial_id": row["trial_id"],
                          f"{METRIC}_in_sweep": float(row[METRIC]), "best_epoch": int(state["best_epoch"]),
                          "trials": int(len(table))}},
    )
    result.update({"trial_id": row["trial_id"], METRIC: float(row[METRIC]), "params": _params(row),
                   "best_epoch": int(state["best_epoch"])})
    return result


def best_cv_row(table: pd.DataFrame, k: int) -> pd.Series:
    """The finished trial with all k folds and the best CV mean (ties: the earlier trial). A trial
    ASHA stopped after fewer folds is never chosen: its ensemble would miss members."""
    from cxr_search.folds import FOLDS_DONE

    complete = table[table[FOLDS_DONE] >= k] if FOLDS_DONE in table else table.iloc[0:0]
    if complete.empty or complete[METRIC].isna().all():
        raise CxrError(f"no trial completed all {k} folds: see results.csv (more --trials, or a larger "
                       "--reduction-factor lets more trials reach the last fold)")
    return best_row(complete)


def load_cv_checkpoint(checkpoint_path: str) -> tuple[list, dict, Any]:
    """([fold models], state, TrainConfig) from a CV trial's checkpoint (search/cv_trial.py)."""
    from ray import tune

    folder = Path(tune.Checkpoint(checkpoint_path).to_directory())
    state = json.loads((folder / STATE_FILE).read_text())
    train_cfg = TrainConfig.from_dict(state["train_config"])
    members = [_model_with_weights(train_cfg, folder / fold_dir(f["fold"]) / WEIGHTS_FILE) for f in state["folds"]]
    return members, state, train_cfg


def out_of_fold(state: dict, n: int) -> np.ndarray:
    """P(PNEUMONIA) of every image of the pool from the one fold model that did not train on it."""
    probs = np.full(n, np.nan)
    for fold in state["folds"]:
        probs[np.asarray(fold["held_out"], dtype=np.int64)] = fold["oof_probs"]
    if np.isnan(probs).any():
        raise CxrError("the best trial's checkpoint lacks out-of-fold predictions for some images: "
                       "its folds do not match RUN/folds.csv")
    return probs


def export_cv_best(cfg: SearchConfig, table: pd.DataFrame, pool) -> dict[str, Any]:
    """The best CV configuration's K fold models as ONE exported model (the mean of their
    probabilities, `cxr_model.model.ensemble_model`), its threshold and operating points chosen on
    the out-of-fold predictions, evaluated once on test. Also the test AUC of its best single
    fold model, beside the ensemble's, for the report."""
    from cxr_model.finalize import load_split
    from cxr_model.model import ensemble_model, predict_proba

    row = best_cv_row(table, cfg.cv)
    members, state, train_cfg = load_cv_checkpoint(row["checkpoint"])
    folds = state["folds"]
    oof = out_of_fold(state, len(pool.y))
    ensemble = ensemble_model(members)
    best_epochs = [int(f["best_epoch"]) for f in folds]
    cv = {
        "k": cfg.cv, "folds_file": "folds.csv",
        f"{METRIC}_mean": float(row[METRIC]), f"{METRIC}_se": float(row["cv_se"]),
        "folds": [{"fold": f["fold"], METRIC: f["best_value"], "best_epoch": f["best_epoch"],
                   "epochs_run": f["epochs_run"], "n_held_out": len(f["held_out"])} for f in folds],
        "members": len(members), "shared_base": any(layer.name == "vgg16" for layer in ensemble.layers),
    }
    if cfg.refit:
        refit_epochs = max(1, int(np.median(best_epochs)))
        exported = refit_model(cfg, train_cfg, pool, refit_epochs)
        card_cfg = dataclasses.replace(train_cfg, epochs=refit_epochs)
        cv["exported"] = f"refit on all of train + val for {refit_epochs} epochs (the median of the folds' best epochs)"
    else:
        exported, card_cfg = ensemble, train_cfg
        cv["exported"] = f"the mean of the {len(members)} fold models' probabilities"
    result = finalize(
        exported, card_cfg, cfg.prepared, cfg.run_dir / BEST_DIR, val_scores=(pool.y, oof), threshold_split="oof",
        threshold_method=cfg.threshold_method, n_boot=cfg.n_boot, overwrite=True, formats=cfg.formats,
        extra={"search": {"run_dir": str(cfg.run_dir), "trial_id": row["trial_id"],
                          f"{METRIC}_in_sweep": float(row[METRIC]), "trials": int(len(table))}, "cv": cv},
    )
    # Beside the exported model, on the same test images and threshold: the ensemble (when the
    # refit is exported) and the best single fold model (by its fold's validation AUC).
    x_test, y_test = load_split(cfg.prepared, "test")

    def test_auc(model) -> dict:
        return metrics_from_probs(y_test, predict_proba(model, x_test), threshold=result["threshold"],
                                  n_boot=cfg.n_boot, seed=train_cfg.seed)["roc_auc"]

    values = [f["best_value"] if f["best_value"] is not None else -np.inf for f in folds]
    best_fold = int(np.argmax(values))
    cv["best_fold"] = {"fold": folds[best_fold]["fold"], "test_roc_auc": test_auc(members[best_fold])}
    if cfg.refit:
        cv["refit"] = {"epochs": card_cfg.epochs, "test_roc_auc": result["metrics"]["test"]["roc_auc"]}
        cv["ensemble_test_roc_auc"] = test_auc(ensemble)
    else:
        cv["ensemble_test_roc_auc"] = result["metrics"]["test"]["roc_auc"]
    cv["oof_roc_auc"] = result["metrics"]["val"]["roc_auc"]
    result.update({"trial_id": row["trial_id"], METRIC: float(row[METRIC]), "params": _params(row),
                   "best_epoch": int(np.median(best_epochs)), "cv": cv})
    return result


def refit_model(cfg: SearchConfig, train_cfg, pool, epochs: int):
    """The configuration trained once on all of train + val for `epochs` epochs (`--refit`).

    Nothing is held out, so nothing is selected on: patience is set past the last epoch (no early
    stop), and fit's validation numbers are on its own training images (logged, never used). The
    threshold then comes from the fold models' out-of-fold predictions, the only honest scores of
    this configuration on images it did not train on."""
    from cxr_model import Data, FeatureCache, fit

    fixed = dataclasses.replace(train_cfg, epochs=epochs, patience=epochs + 1)
    everything = Data(pool.x, pool.y, pool.x, pool.y)
    return fit(fixed, everything, feature_cache=FeatureCache(cfg.feature_cache_dir)).model


def _params(row: pd.Series) -> dict[str, Any]:
    out = {}
    for name in result_params():
        value = row.get(name)
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[name] = value.item() if hasattr(value, "item") else value
    return out
