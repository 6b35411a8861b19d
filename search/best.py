"""The best trial: chosen on validation, rebuilt from its checkpoint, scored ONCE on test, exported.

Why from the checkpoint and not by retraining its config: the checkpoint holds exactly the weights
whose validation AUC won the sweep (each trial checkpoints only its best epoch), so the model we
export is the model we selected. A retrain would cost another full run and, with nondeterministic
GPU kernels, land on a different model whose validation score nobody looked at. The threshold,
the test evaluation and the export are `cxr_model.pipeline.finalize`, the same code `cxr train`
uses, so a searched model and a trained one are exported and reported identically.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_datasets.errors import CxrError
from cxr_model import TrainConfig
from cxr_model.pipeline import finalize
from cxr_search.checkpoint import STATE_FILE, WEIGHTS_FILE, load_weights
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

    Returns pipeline.finalize()'s dict plus the trial's id, parameters and METRIC in the sweep.
    """
    row = best_row(table)
    model, state, trial_cfg = load_checkpoint(row["checkpoint"])
    # The card records what was trained: the trial's config, up to its best (checkpointed) epoch.
    train_cfg = dataclasses.replace(trial_cfg, epochs=int(state["epoch"]))
    val = (data.x_val, data.y_val) if data is not None else None
    result = finalize(
        model, train_cfg, cfg.prepared, cfg.run_dir / BEST_DIR, history=state["history"], val=val,
        threshold_method=cfg.threshold_method, n_boot=cfg.n_boot, overwrite=True,
        extra={"search": {"run_dir": str(cfg.run_dir), "trial_id": row["trial_id"],
                          f"{METRIC}_in_sweep": float(row[METRIC]), "best_epoch": int(state["best_epoch"]),
                          "trials": int(len(table))}},
    )
    result.update({"trial_id": row["trial_id"], METRIC: float(row[METRIC]), "params": _params(row),
                   "best_epoch": int(state["best_epoch"])})
    return result


def _params(row: pd.Series) -> dict[str, Any]:
    out = {}
    for name in result_params():
        value = row.get(name)
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[name] = value.item() if hasattr(value, "item") else value
    return out
