"""The embedded synthetic data set: real-like layout, sizes and names, and classes that global
image statistics cannot tell apart (after preprocessing) while the pixels can."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cxr_datasets
from cxr_datasets import CxrError
from cxr_datasets.discover import discover


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties are vanishingly rare for these float scores)."""
    ranks = np.argsort(np.argsort(scores)) + 1
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def logistic_auc(features: np.ndarray, labels: np.ndarray, steps: int = 2000) -> float:
    """In-sample AUC of a logistic regression (plain gradient descent): optimistic, so being near
    chance here is a strong statement."""
    x = (features - features.mean(0)) / features.std(0)
    x = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        w -= 0.5 * x.T @ (p - labels) / len(x)
    return auc(x @ w, labels)


@pytest.fixture(scope="module")
def synth_files(synth_source) -> pd.DataFrame:
    rows = []
    found = discover(synth_source)
    for f in found.files:
        with Image.open(Path(found.base) / f.rel_path) as image:
            rows.append({"label": f.label, "split": f.official_split, "patient": f.patient_id,
                         "parsed": f.patient_from_name, "name": Path(f.rel_path).name,
                         "width": image.size[0], "height": image.size[1], "mode": image.mode})
    return pd.DataFrame(rows)


def test_layout_counts_and_class_ratio(synth_files):
    assert len(synth_files) == 120
    assert synth_files["label"].mean() == pytest.approx(0.73, abs=0.03)  # ~1:3 NORMAL:PNEUMONIA
    for split in ("train", "val", "test"):
        assert set(synth_files.loc[synth_files["split"] == split, "label"]) == {0, 1}


def test_real_like_sizes_names_and_modes(synth_files):
    assert synth_files[["width", "height"]].min().min() >= 250
    assert synth_files[["width", "height"]].max().max() <= 2200
    assert (synth_files["width"] != synth_files["height"]).all()
    area = synth_files["width"] * synth_files["height"]
    assert area[synth_files["label"] == 0].mean() > 1.5 * area[synth_files["label"] == 1].mean()
    assert (synth_files["mode"] == "RGB").sum() >= 1
    assert synth_files["parsed"].all()
    assert synth_files.groupby("patient").size().max() >= 2  # several images for some patients
    assert synth_files.groupby("patient")["split"].nunique().eq(1).all()
    normal_ids = set(synth_files.loc[synth_files["label"] == 0, "patient"])
    im = {p.removeprefix("IM-") for p in normal_ids if p.startswith("IM-")}
    assert im & {p.removeprefix("NORMAL2-IM-") for p in normal_ids if p.startswith("NORMAL2-")}


def test_seeded_and_refuses_to_mix_into_existing_images(tmp_path):
    first = cxr_datasets.synth(tmp_path / "a", n=40, seed=5)
    second = cxr_datasets.synth(tmp_path / "b", n=40, seed=5)
    files = sorted(p.relative_to(first) for p in first.rglob("*.jpeg"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.jpeg"))
    assert (first / files[0]).read_bytes() == (second / files[0]).read_bytes()
    with pytest.raises(CxrError, match="already holds images"):
        cxr_datasets.synth(tmp_path / "a", n=40, seed=5)


def test_global_statistics_are_near_chance_after_preprocessing(prepared_small):
    parts = [cxr_datasets.load(prepared_small, split) for split in cxr_datasets.SPLITS]
    images = np.concatenate([p[0] for p in parts]).astype(np.float64)
    labels = np.concatenate([p[1] for p in parts])
    meta = pd.concat([p[2] for p in parts])
    mean = images.mean(axis=(1, 2, 3))
    std = images.std(axis=(1, 2, 3))
    aspect = (meta["orig_width"] / meta["orig_height"]).to_numpy()  # what the letterbox shows
    for score in (mean, std, aspect):
        assert 0.3 < auc(score, labels) < 0.7
    assert logistic_auc(np.column_stack([mean, std, aspect]), labels) < 0.75


def test_contrast_inside_the_chest_does_separate_the_classes(prepared_small):
    """A crude spatial feature already separates what global statistics cannot: opacities fill the
    dark lung fields, so the centre of a PNEUMONIA image has less contrast than the whole."""
    parts = [cxr_datasets.load(prepared_small, split) for split in cxr_datasets.SPLITS]
    x = np.concatenate([p[0] for p in parts])[..., 0].astype(np.float64)
    labels = np.concatenate([p[1] for p in parts])
    z = (x - x.mean(axis=(1, 2), keepdims=True)) / x.std(axis=(1, 2), keepdims=True)
    size = x.shape[1]
    centre = z[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4]
    assert auc(centre.std(axis=(1, 2)), labels) < 0.35


@pytest.mark.slow
def test_a_small_cnn_learns_the_task(ray_session, tmp_path):
    """The demo's premise: a tiny CNN at 32 px reaches a high test AUC in seconds on a CPU."""
    import keras

    source = cxr_datasets.synth(tmp_path / "synth", n=600, seed=0)
    prepared = tmp_path / "prepared"
    cxr_datasets.prepare(source, prepared, image_size=32, verbose=False)
    (x_train, y_train, _), (x_test, y_test, _) = (cxr_datasets.load(prepared, s) for s in ("train", "test"))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 1)), keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(16, 3, activation="relu", padding="same"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu", padding="same"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    weights = cxr_datasets.read_manifest(prepared)["class_weights"]
    model.fit(x_train, y_train, epochs=30, batch_size=32, verbose=0,
              class_weight={int(k): v for k, v in weights.items()})
    assert auc(model.predict(x_test, verbose=0)[:, 1], y_test) > 0.9
