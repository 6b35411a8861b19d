"""Export a trained model with everything needed to use and audit it, and load it back.

    run_dir = export(model, "runs/model", train_cfg=cfg, threshold=t, metrics={"val": m_val, "test": m_test},
                     manifest_hash=cxr_datasets.manifest_hash(prepared), history=history)
    model, card = load_model("runs/model")      # keras.saving.load_model(..., safe_mode=True)

An export folder holds:
    model.keras        the inference graph: raw uint8 grayscale [S, S, 1] in, softmax [P(NORMAL),
                       P(PNEUMONIA)] out; built-in Keras layers only, so plain Keras 3 loads it in
                       safe mode on any backend without cxr-tune installed
    saved_model/       the same as a TF SavedModel (TF Serving; `serve` endpoint), from either backend
    model.onnx         the same as ONNX (onnxruntime; input "image" uint8 NHWC)
                       (these two unless `formats` leaves them out: cxr_model.config.EXPORT_FORMATS)
    model_card.json    config, threshold and how it was chosen, metrics with 95% intervals, class names,
                       input spec, the data manifest's hash, package versions, creation time
    metrics.json       the full metrics (ROC points included) and the training history
    plots/*.png        learning curves, confusion matrices, ROC, PR and reliability curves per split

The card lists every model file with its sha256 (`files.artifacts`); `model_sha256` is that of
model.keras, the identity `cxr serve` reports.

Everything is written into a hidden sibling folder first and renamed into place at the end, so a
crash never leaves a half-written export and an existing one is replaced whole or not at all.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from cxr_datasets.config import CLASS_NAMES  # label 0, 1
from cxr_datasets.errors import CxrError
from cxr_datasets.versions import package_versions

from .config import EXPORT_FORMATS, check_formats
from .export_formats import MODEL_FILE, ONNX_FILE, SAVED_MODEL_DIR

CARD_FILE = "model_card.json"
METRICS_FILE = "metrics.json"
PLOTS_DIR = "plots"
CARD_SCHEMA_VERSION = 2  # 2: portable model.keras, ONNX, sha256 of every model file
# The name of the exported graph's input in every format (Keras Input, SavedModel, ONNX).
INPUT_NAME = "image"
# Distributions whose versions go into the card (those installed; none is imported for this).
_VERSIONED = ("cxr-tune", "keras", "tensorflow", "jax", "jaxlib", "numpy", "ray", "optuna", "pillow", "pydicom")


def export(model, run_dir, *, train_cfg, threshold: float, metrics: dict, manifest_hash: str | None = None,
           history=None, extra: dict | None = None, threshold_method: str | None = None,
           target_sensitivity: float | None = None, resize: str = "pad", overwrite: bool = False,
           threshold_split: str = "val", formats=EXPORT_FORMATS) -> Path:
    """Write the export folder `run_dir` (see the module docstring) and return its path.

    metrics: {split: evaluate() output}, e.g. {"val": ..., "test": ...}; a single evaluate() output
    is taken as the test metrics. resize: the prepared data's resize mode ("pad" or "crop"), which
    `cxr predict` must apply to new images. Refuses a non-empty existing run_dir unless overwrite.
    threshold_split: what the threshold was chosen on, as the card records it ("val", or "oof": the
    out-of-fold predictions of a cross-validated sweep). formats: the model files to write, among
    EXPORT_FORMATS; model.keras always.
    """
    formats = check_formats(formats)
    run_dir = Path(run_dir)
    check_export_target(run_dir, overwrite)
    metrics = _by_split(metrics)
    staging = run_dir.parent / f".{run_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        artifacts = _save_model(model, staging, formats)
        plot_files = _write_plots(staging / PLOTS_DIR, metrics, history)
        card = _model_card(model, train_cfg, threshold, metrics, manifest_hash, extra, threshold_method,
                           target_sensitivity, resize, artifacts, plot_files, threshold_split)
        _write_json(staging / CARD_FILE, card)
        _write_json(staging / METRICS_FILE, {"metrics": metrics, "history": _history_dict(history)})
        _move_into_place(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return run_dir


def load_model(run_dir, verify: bool = True):
    """(keras.Model, card dict) from an export folder; the model is loaded with safe_mode=True.

    verify: model.keras must have the sha256 the card records (`model_sha256`), so a model file
    swapped for another is refused instead of being used with this card's threshold and metrics.
    `--no-verify` turns it off for a user who knowingly edits the model.
    """
    import keras

    import cxr_model.model  # noqa: F401  registers the custom layers that safe-mode loading needs

    run_dir = Path(run_dir)
    for name in (CARD_FILE, MODEL_FILE):
        if not (run_dir / name).is_file():
            raise CxrError(f"{run_dir} is not an exported model: {name} is missing "
                           "(create one with `cxr train` or `cxr search`)")
    card = read_card(run_dir)
    if verify:
        verify_model_file(run_dir, card)
    # compile=False: prediction and evaluation need no optimizer state, and loading is faster.
    model = keras.saving.load_model(run_dir / MODEL_FILE, safe_mode=True, compile=False)
    return model, card


def verify_model_file(run_dir, card: dict) -> None:
    """CxrError unless the export's model.keras has the sha256 its model card records."""

    expected = card.get("model_sha256")
    if not expected:
        raise CxrError(f"{Path(run_dir) / CARD_FILE} records no model_sha256, so {MODEL_FILE} cannot be "
                       "verified (re-export it, or pass --no-verify)")
    actual = sha256_file(Path(run_dir) / MODEL_FILE)
    if actual != expected:
        raise CxrError(f"{Path(run_dir) / MODEL_FILE} is not the model its card describes: sha256 {actual}, "
                       f"the card says {expected} (pass --no-verify to use it anyway)")


def read_card(run_dir) -> dict:
    """The model card of an export folder, without loading the model."""

    path = Path(run_dir) / CARD_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrError(f"{run_dir} is not an exported model: {CARD_FILE} is missing") from None
    except json.JSONDecodeError as exc:
        raise CxrError(f"{path} is not valid JSON ({exc})") from None


def check_export_target(run_dir, overwrite: bool = False) -> None:
    """CxrError unless `run_dir` is absent, an empty folder, or may be overwritten."""

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CxrError(f"{run_dir} exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise CxrError(f"{run_dir} already exists and is not empty: choose another --out or pass --overwrite")


# ----------------------------------------------------------------------------- the parts


def _by_split(metrics: dict) -> dict:
    if "confusion_matrix" in metrics:  # one evaluate() output: the exported model's test metrics
        return {"test": metrics}
    return dict(metrics)


def _save_model(model, folder: Path, formats: tuple[str, ...]) -> list[dict]:
    """model.keras, saved_model/ and model.onnx (those of `formats`) of the portable inference
    graph; their card entries.

    The inference graph (see `cxr_model.model.inference_model`) holds built-in layers only and no
    compile state, so loading it needs neither cxr-tune nor its custom metric. The SavedModel and
    ONNX come from Keras's own `model.export` (ONNX through tf2onnx) in a child process on
    TensorFlow that loads the just-written model.keras (cxr_model/export_formats.py), on every
    backend: the conversion's memory (+3.6 GB for a 224 px VGG16 when it ran in the driver) is
    returned when the child exits instead of staying in a sweep's driver; on JAX, Keras's own
    path to ONNX would need jax2onnx, and a TensorFlow-native SavedModel serves in TF Serving
    without JAX's XlaCallModule.
    """
    from cxr_model.model import inference_model

    graph = inference_model(model)
    graph.save(folder / MODEL_FILE)
    others = [f for f in formats if f != "keras"]
    if others:
        _export_formats_on_tensorflow(folder, others)
    artifacts = [_artifact(folder, MODEL_FILE, "keras", "keras.saving.load_model(path, safe_mode=True)")]
    if "saved_model" in formats:
        artifacts += [_artifact(folder, str(p.relative_to(folder)), "tf_saved_model",
                                "tf.saved_model.load(dir).serve(images)")
                      for p in sorted((folder / SAVED_MODEL_DIR).rglob("*")) if p.is_file()]
    if "onnx" in formats:
        artifacts.append(_artifact(folder, ONNX_FILE, "onnx",
                                   "onnxruntime.InferenceSession(path).run(None, {'image': images})"))
    return artifacts


def _export_formats_on_tensorflow(folder: Path, formats: list[str]) -> None:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-I", "-m", "cxr_model.export_formats", str(folder), *formats],
                          env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no error output"]
        raise CxrError(f"exporting the SavedModel and ONNX on TensorFlow failed: {tail[0]}")


def _artifact(folder: Path, name: str, fmt: str, loads_with: str) -> dict:
    path = folder / name
    return {"path": name, "format": fmt, "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "loads_with": loads_with}


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_plots(folder: Path, metrics: dict, history) -> list[str]:
    from cxr_model import plots

    files = []
    if _history_dict(history):
        files.append(plots.plot_history(history, folder / "curves.png"))
    for split, m in metrics.items():
        files.append(plots.plot_confusion_matrix(m["confusion_matrix"], folder / f"confusion_{split}.png",
                                                 title=f"Confusion matrix ({split}, n={m['n']})"))
        if "roc" in m:
            files.append(plots.plot_roc(m, folder / f"roc_{split}.png", title=f"ROC ({split}, n={m['n']})"))
        if "pr" in m:
            files.append(plots.plot_pr(m, folder / f"pr_{split}.png", title=f"Precision-recall ({split}, n={m['n']})"))
        if "calibration" in m:
            files.append(plots.plot_reliability(m, folder / f"reliability_{split}.png",
                                                title=f"Reliability ({split}, n={m['n']})"))
    return [f"{PLOTS_DIR}/{Path(f).name}" for f in files]


def _model_card(model, train_cfg, threshold, metrics, manifest_hash, extra, threshold_method,
                target_sensitivity, resize, artifacts, plot_files, threshold_split="val") -> dict:
    import keras

    config = train_cfg.to_dict() if hasattr(train_cfg, "to_dict") else dict(train_cfg)
    shape = [int(d) for d in model.input_shape[1:]]
    written = {a["format"] for a in artifacts}
    return {
        "schema_version": CARD_SCHEMA_VERSION,
        "model": "VGG16 transfer learning, pneumonia vs normal chest X-ray (cxr-tune)",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[1],
        "input": {"shape": shape, "dtype": "uint8", "image_size": shape[0], "resize": resize,
                  "grayscale": True, "preprocess": "cxr_datasets.preprocess_file"},
        "input_spec": {"name": INPUT_NAME, "shape": [None, *shape], "dtype": "uint8", "layout": "NHWC",
                       "values": "gray levels 0-255 as `cxr prepare` writes them (no scaling)"},
        "output": "softmax [P(NORMAL), P(PNEUMONIA)], float32",
        "output_spec": {"shape": [None, 2], "dtype": "float32", "columns": list(CLASS_NAMES)},
        "threshold": float(threshold),
        "decision_rule": "PNEUMONIA if P(PNEUMONIA) >= threshold",
        "threshold_selection": {"method": threshold_method, "target_sensitivity": target_sensitivity,
                                "split": threshold_split},
        "config": config,
        # ROC/PR points and calibration bins stay in metrics.json; the card keeps the numbers a
        # reader compares.
        "metrics": {split: {k: v for k, v in m.items() if k not in _CURVE_KEYS} for split, m in metrics.items()},
        "operating_points": _operating_points(metrics),
        "data": {"manifest_hash": manifest_hash},
        "backend": keras.backend.backend(),
        "versions": _versions(),
        "model_sha256": next(a["sha256"] for a in artifacts if a["path"] == MODEL_FILE),
        "files": {"model": MODEL_FILE, "saved_model": SAVED_MODEL_DIR if "tf_saved_model" in written else None,
                  "onnx": ONNX_FILE if "onnx" in written else None,
                  "metrics": METRICS_FILE, "plots": plot_files, "artifacts": artifacts},
        "extra": extra or {},
    }


_CURVE_KEYS = ("roc", "pr", "calibration")


def _operating_points(metrics: dict) -> list[dict]:
    """The operating points (chosen on validation) with their thresholds, as the card lists them."""
    for m in metrics.values():
        if m.get("operating_points"):
            return [{k: op[k] for k in ("name", "method", "target", "threshold")} for op in m["operating_points"]]
    return []


def _versions() -> dict:
    return package_versions(_VERSIONED)


def _history_dict(history) -> dict:
    logs = getattr(history, "history", history) or {}
    return {k: [float(v) for v in values] for k, values in logs.items()}


def _write_json(path: Path, obj) -> None:
    # allow_nan=False guarantees strict JSON: undefined metrics were turned into null.
    path.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def json_safe(obj):
    """Plain JSON values: NaN/inf -> None, numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _move_into_place(staging: Path, run_dir: Path) -> None:
    """Rename `staging` to `run_dir`; an existing run_dir is moved aside first and removed after."""
    if not run_dir.exists():
        os.rename(staging, run_dir)
        return
    retired = run_dir.parent / f".{run_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(run_dir, retired)
    try:
        os.rename(staging, run_dir)
    except BaseException:
        os.rename(retired, run_dir)  # put the previous export back
        raise
    shutil.rmtree(retired, ignore_errors=True)
