"""Predict PNEUMONIA for new image files with an exported model, at the model card's threshold.

    df = predict_paths("runs/model", ["scan.jpeg", "folder_of_scans/"], gradcam_dir="heatmaps")
    cxr predict runs/model scans/ --out preds.csv --gradcam heatmaps/      # the same from the shell

Each file goes through `cxr_datasets.preprocess_file` with the card's image size and resize mode: the
very function `cxr prepare` applied to the training images (imported, never re-implemented). A file
that cannot be used gets a row with its error and no probability; the others are still predicted.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cxr_datasets.config import IMAGE_EXTENSIONS as IMAGE_SUFFIXES  # what `cxr prepare` discovers
from cxr_datasets.discover import enter_folder, is_image_name
from cxr_datasets.errors import CxrError
from cxr_datasets.progress import Progress
from cxr_model.export import load_model

COLUMNS = ["path", "p_pneumonia", "label", "threshold", "error"]
# Files are decoded and predicted this many at a time, so a folder of 100k scans never sits in memory.
CHUNK = 256


def predict_paths(model_dir, paths, batch_size: int = 32, gradcam_dir=None, progress=None, verify: bool = True):
    """A pandas DataFrame with one row per image file: path, p_pneumonia, label, threshold, error.

    paths: files and folders (searched recursively for .jpeg .jpg .png .dcm, any letter case).
    gradcam_dir: when given, a Grad-CAM overlay PNG per predicted image is written there and its
    path is added as a `gradcam` column.
    progress: called as progress(files_done, files_total) after each chunk (e.g. a FileProgress).
    verify: refuse a model.keras whose sha256 is not the card's (`export.load_model`).
    """
    import pandas as pd


    model, card = load_model(model_dir, verify=verify)
    files = expand_paths(paths)
    rows = []
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        rows.extend(_predict_chunk(model, card, chunk, batch_size, gradcam_dir, start))
        if progress is not None:
            progress(len(rows), len(files))
    columns = COLUMNS + (["gradcam"] if gradcam_dir is not None else [])
    if any(row.get("path_bytes_hex") for row in rows):
        columns.append("path_bytes_hex")
    return pd.DataFrame(rows, columns=columns)


class FileProgress(Progress):
    """Files done / total, rate and ETA on stderr (datasets/progress.py); `cxr predict` shows it
    unless --quiet."""

    def __init__(self, stream=None, every_s: float = 10.0):
        super().__init__("predict", "files", stream=stream, every_s=every_s)


def expand_paths(paths) -> list[Path]:
    """Files as given, plus image files found recursively in folders, each folder's sorted.

    A path that does not exist is kept: it becomes an error row, like any other unusable input.
    """

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_image_file(p, path))
            if not found:
                raise CxrError(f"no {'/'.join(IMAGE_SUFFIXES)} files found in folder {path}")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise CxrError("no input files given")
    return files


def _is_image_file(path: Path, root: Path) -> bool:
    # The predicates `cxr prepare` discovers with: hidden files (macOS "._x.jpeg" forks) are not
    # images, and hidden folders (".git") and __MACOSX below `root` are not searched.
    folders = path.relative_to(root).parts[:-1]
    return is_image_name(path.name) and all(map(enter_folder, folders)) and path.is_file()


def _predict_chunk(model, card, files, batch_size, gradcam_dir, first_index) -> list[dict]:
    from cxr_model import predict_proba

    threshold = float(card["threshold"])
    images, errors = _preprocess(files, card["input"])
    good = [i for i, e in enumerate(errors) if e is None]
    probs = np.full(len(files), np.nan)
    overlays: list[str | None] = [None] * len(files)
    if good:
        batch = np.stack([images[i] for i in good])[..., None]  # [N, S, S, 1] uint8, as in training
        probs[good] = predict_proba(model, batch, batch_size=batch_size)
        if gradcam_dir is not None:
            names = [_overlay_name(files[i], first_index + i) for i in good]
            for i, path in zip(good, _write_gradcam(model, batch, Path(gradcam_dir), names)):
                overlays[i] = str(path)
    classes = card["class_names"]
    return [_row(path, probs[i], threshold, classes, errors[i], overlays[i], gradcam_dir)
            for i, path in enumerate(files)]


def _preprocess(files, input_spec: dict):
    """(list of uint8 [S, S] or None, list of error message or None) for each file."""
    from cxr_datasets import preprocess_file

    images: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for path in files:
        try:
            images.append(preprocess_file(path, image_size=int(input_spec["image_size"]),
                                          resize=input_spec["resize"]))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - one unusable file must not stop the others
            images.append(None)
            errors.append(getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")
    return images, errors


def _row(path, prob, threshold, class_names, error, overlay, gradcam_dir) -> dict:
    ok = error is None
    row = {
        **_printable_path(str(path)),
        "p_pneumonia": float(prob) if ok else np.nan,
        "label": class_names[int(prob >= threshold)] if ok else None,
        "threshold": threshold,
        "error": error,
    }
    if gradcam_dir is not None:
        row["gradcam"] = overlay
    return row


def _write_gradcam(model, batch, out_dir: Path, names: list[str]) -> list[Path]:
    from cxr_model.gradcam import gradcam_heatmaps, write_overlays

    return write_overlays(batch, gradcam_heatmaps(model, batch), [out_dir / n for n in names])


def _overlay_name(path: Path, index: int) -> str:
    # The running index keeps names unique when two folders hold files with the same name.
    return f"{index:05d}_{path.stem}_gradcam.png"


def _printable_path(path: str) -> dict:
    """{"path"}: a name that is not UTF-8 (os.fsdecode's surrogates, which pyarrow-backed pandas
    and the CSV cannot encode) with its bad bytes escaped as \\xNN, and then also its exact
    bytes as {"path_bytes_hex"}."""
    escaped = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if escaped == path:
        return {"path": path}
    return {"path": escaped, "path_bytes_hex": os.fsencode(path).hex()}
