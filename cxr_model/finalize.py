"""One configuration end to end: fit, threshold on validation, ONE test evaluation, export.

    from cxr_model.finalize import train_and_export
    result = train_and_export(TrainConfig(model=ModelConfig(image_size=224)), "runs/prepared", "runs/model")
    result["metrics"]["test"]["roc_auc"]     # {"value", "ci_low", "ci_high"}

The prepared data may be a local folder or a pyarrow.fs URI (s3://bucket/prepared): it is read
through `cxr_datasets.storage.Location` once per call, and the model card records its manifest hash,
which is the same for a folder and its copy in a bucket.

`finalize` is the only code path that reads the test split to score a model before export; `cxr
train` calls it through `train_and_export` and the search calls it for its best trial, so every
exported model has been evaluated on test exactly once, at a threshold chosen on validation.
"""
from __future__ import annotations

from pathlib import Path

import cxr_datasets
from cxr_datasets import manifest_hash, read_manifest
from cxr_datasets.errors import CxrError
from cxr_datasets.storage import Location

from .config import EXPORT_FORMATS, THRESHOLD_METHODS, EvalConfig  # noqa: F401  (THRESHOLD_METHODS: re-exported)
from .data import Data
from .evaluate import choose_operating_points, choose_threshold, evaluate, metrics_from_probs
from .export import check_export_target, export, load_model

_EVAL = EvalConfig()  # the defaults below are EvalConfig's


def train_and_export(train_cfg, prepared_dir, out_dir, *, threshold_method: str = _EVAL.threshold_method,
                     target_sensitivity: float = _EVAL.target_sensitivity, n_boot: int = _EVAL.n_boot,
                     overwrite: bool = False, formats=EXPORT_FORMATS,
                     callbacks=(), feature_cache=None, data=None, extra: dict | None = None) -> dict:
    """Train `train_cfg` on the prepared data and export it to `out_dir`; returns finalize()'s dict.

    prepared_dir: a local folder or a pyarrow.fs URI (s3://bucket/prepared, file:///data/p).
    data: a `cxr_model.Data` already loaded from `prepared_dir` (the search passes its shared one).
    """
    from .train import fit  # Keras (and its backend): loaded when a model is trained

    check_export_target(out_dir, overwrite)  # fail before training, not after
    prepared_dir = Location.of(prepared_dir)  # a URI's file system is resolved once
    data = data if data is not None else Data.from_prepared(prepared_dir)
    _check_image_size(train_cfg, data.x_val.shape[1])
    history = fit(train_cfg, data, callbacks=callbacks, feature_cache=feature_cache)
    return finalize(history.model, train_cfg, prepared_dir, out_dir, history=history,
                    val=(data.x_val, data.y_val), threshold_method=threshold_method,
                    target_sensitivity=target_sensitivity, n_boot=n_boot, overwrite=overwrite, extra=extra,
                    formats=formats)


def finalize(model, train_cfg, prepared_dir, out_dir, *, history=None, val=None,
             threshold_method: str = _EVAL.threshold_method, target_sensitivity: float = _EVAL.target_sensitivity,
             n_boot: int = _EVAL.n_boot, overwrite: bool = False, extra: dict | None = None,
             val_scores=None, threshold_split: str = "val", formats=EXPORT_FORMATS) -> dict:
    """Threshold on validation, metrics on validation and test at that threshold, export.

    1. P(PNEUMONIA) on the validation split (`val` = (images, labels), else loaded from prepared_dir);
       or `val_scores` = (labels, probabilities) already computed: a cross-validated sweep passes
       the out-of-fold predictions of train + val (threshold_split="oof", as the card records)
    2. the threshold and the fixed operating points from validation alone (choose_threshold,
       choose_operating_points)
    3. validation metrics at that threshold
    4. the test split is loaded and scored once, at the same threshold
    5. export, with both splits' metrics in the model card
    Returns {"model_dir", "threshold", "threshold_method", "metrics": {"val", "test"}}.
    """
    from .model import predict_proba  # Keras: a model is at hand, so it is loaded already

    prepared_dir = Location.of(prepared_dir)
    if val_scores is not None:
        y_val, val_probs = val_scores
    else:
        x_val, y_val = val if val is not None else load_split(prepared_dir, "val")
        val_probs = predict_proba(model, x_val)
    threshold = choose_threshold(y_val, val_probs, method=threshold_method, target=target_sensitivity)
    points = choose_operating_points(y_val, val_probs)
    seed = train_cfg.seed
    metrics = {"val": metrics_from_probs(y_val, val_probs, threshold=threshold, n_boot=n_boot, seed=seed,
                                         operating_points=points)}
    x_test, y_test = load_split(prepared_dir, "test")
    metrics["test"] = evaluate(model, x_test, y_test, threshold=threshold, n_boot=n_boot, seed=seed,
                               operating_points=points)
    run_dir = export(
        model, out_dir, train_cfg=train_cfg, threshold=threshold, metrics=metrics,
        manifest_hash=manifest_hash(prepared_dir), history=history, extra=extra,
        threshold_method=threshold_method,
        target_sensitivity=target_sensitivity if threshold_method == "sensitivity" else None,
        resize=read_manifest(prepared_dir)["options"]["resize"], overwrite=overwrite, threshold_split=threshold_split,
        formats=formats,
    )
    return {"model_dir": Path(run_dir), "threshold": threshold, "threshold_method": threshold_method,
            "metrics": metrics}


def evaluate_export(model_dir, prepared_dir, split: str = "test", n_boot: int = _EVAL.n_boot, seed: int = 0,
                    verify: bool = True) -> dict:
    """Metrics of an exported model on a prepared split, at the threshold in its model card.

    Returns {"metrics", "card", "same_data"}; same_data tells whether the prepared data's manifest
    hash is the one the model was trained and evaluated with.
    """
    model, card = load_model(model_dir, verify=verify)
    prepared_dir = Location.of(prepared_dir)
    options = read_manifest(prepared_dir)["options"]
    spec = card["input"]
    if int(options["image_size"]) != int(spec["image_size"]) or options["resize"] != spec["resize"]:
        raise CxrError(f"{prepared_dir} was prepared at {options['image_size']} px ({options['resize']}) but the "
                       f"model takes {spec['image_size']} px ({spec['resize']}): prepare it with "
                       f"--image-size {spec['image_size']} --resize {spec['resize']}")
    images, labels = load_split(prepared_dir, split)
    metrics = evaluate(model, images, labels, threshold=float(card["threshold"]), n_boot=n_boot, seed=seed,
                       operating_points=card.get("operating_points") or None)
    same = card.get("data", {}).get("manifest_hash") == manifest_hash(prepared_dir)
    return {"metrics": metrics, "card": card, "same_data": same}


def load_split(prepared_dir, split: str):
    """(images uint8 [N, S, S, 1], labels int [N]) of one prepared split; CxrError if it is empty."""
    images, labels, _meta = cxr_datasets.load(prepared_dir, split)
    if len(labels) == 0:
        raise CxrError(f"the {split} split of {prepared_dir} is empty")
    return images, labels


def _check_image_size(train_cfg, data_size: int) -> None:
    if int(train_cfg.model.image_size) != int(data_size):
        raise CxrError(f"the model is configured for {train_cfg.model.image_size} px images but the "
                       f"prepared data is {data_size} px")
