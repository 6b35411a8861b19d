"""`cxr predict` and Grad-CAM on real sample X-rays and on broken files, on both Keras backends."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from dicom_util import write_dicom

SIZE = 64  # block5_conv3 is then 4 x 4: enough to see a heatmap's shape


@pytest.fixture(scope="module")
def model_dir(exported_64):
    return exported_64


def _sample_files(samples_dir):
    return sorted(p for p in samples_dir.rglob("*.jpeg"))


def test_predict_paths_uses_the_prepare_preprocessing_and_card_threshold(model_dir, samples_dir, monkeypatch):
    import cxr_datasets
    from cxr_model.export import load_model
    from cxr_model.predict import predict_paths

    calls = []
    real = cxr_datasets.preprocess_file

    def spy(path, **kwargs):
        calls.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(cxr_datasets, "preprocess_file", spy)
    table = predict_paths(model_dir, [samples_dir])  # a folder: searched recursively
    files = _sample_files(samples_dir)
    assert list(table.columns) == ["path", "p_pneumonia", "label", "threshold", "error"]
    assert table["path"].tolist() == [str(p) for p in files]
    assert calls == [{"image_size": SIZE, "resize": "pad"}] * len(files)
    assert table["error"].isna().all() and table["p_pneumonia"].between(0, 1).all()
    expected_labels = np.where(table["p_pneumonia"] >= 0.5, "PNEUMONIA", "NORMAL")
    assert (table["label"] == expected_labels).all() and (table["threshold"] == 0.5).all()
    model, _ = load_model(model_dir)
    x = np.stack([real(p, image_size=SIZE, resize="pad") for p in files])[..., None]
    np.testing.assert_allclose(table["p_pneumonia"], model.predict(x, verbose=0)[:, 1], rtol=1e-6)


def test_cxr_predict_writes_error_rows_for_bad_files_and_exits_0(model_dir, samples_dir, tmp_path, capsys):
    from cxr_search.main import main

    folder = tmp_path / "incoming" / "nested"
    folder.mkdir(parents=True)
    good = _sample_files(samples_dir)[0]
    shutil.copy(good, folder / "good.JPG")  # upper-case suffix still counts
    write_dicom(folder / "scan.dcm", np.arange(96 * 120).reshape(96, 120) % 4096)
    (folder / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    (folder / "._good.jpeg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: hidden, skipped
    out_csv, heat_dir = tmp_path / "preds.csv", tmp_path / "heat"

    code = main(["predict", str(model_dir), str(samples_dir), str(tmp_path / "incoming"),
                 str(tmp_path / "missing.png"), "--out", str(out_csv), "--gradcam", str(heat_dir)])

    assert code == 0
    table = pd.read_csv(out_csv)
    n_samples = len(_sample_files(samples_dir))
    # the real samples, then good, scan.dcm, corrupt, empty, missing (no notes.txt, no ._good.jpeg)
    assert len(table) == n_samples + 5
    assert table["error"].iloc[:n_samples].isna().all()
    by_name = {os.path.basename(p): row for p, row in zip(table["path"], table.to_dict("records"))}
    for ok in ("good.JPG", "scan.dcm"):
        assert pd.isna(by_name[ok]["error"]) and by_name[ok]["label"] in ("NORMAL", "PNEUMONIA"), ok
    for bad in ("corrupt.jpeg", "empty.png", "missing.png"):
        assert isinstance(by_name[bad]["error"], str) and by_name[bad]["error"], bad
        assert pd.isna(by_name[bad]["p_pneumonia"]) and pd.isna(by_name[bad]["label"])
    assert "empty" in by_name["empty.png"]["error"] and "not found" in by_name["missing.png"]["error"]
    overlays = sorted(heat_dir.iterdir())
    assert len(overlays) == n_samples + 2 and set(table["gradcam"].dropna()) == set(map(str, overlays))
    assert f"{n_samples + 2} predicted, 3 unreadable" in capsys.readouterr().err


def test_cxr_predict_shows_progress_on_stderr_unless_quiet(model_dir, samples_dir, tmp_path, capsys, monkeypatch):
    import cxr_model.predict
    from cxr_search.main import main

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):  # 12 real files, predicted 5 at a time: three chunks
        shutil.copy(_sample_files(samples_dir)[i % len(_sample_files(samples_dir))], folder / f"{i:02d}.jpeg")
    monkeypatch.setattr(cxr_model.predict, "CHUNK", 5)

    assert main(["predict", str(model_dir), str(folder), "--out", str(tmp_path / "p.csv")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict ")]
    # Not a terminal: the first chunk, then at most one line per 10 s, and always the last one.
    assert lines[0].startswith("predict 5/12 files") and "files/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("predict 12/12 files") and "ETA" not in lines[-1]

    assert main(["predict", str(model_dir), str(folder), "--out", str(tmp_path / "q.csv"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "files/s" not in err and "12 predicted, 0 unreadable" in err


def test_file_progress_redraws_one_line_on_a_terminal():
    import io

    from cxr_model.predict import FileProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = FileProgress(stream=stream)
    for done in (5, 10, 12):
        progress(done, 12)
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
    assert "predict 10/12 files" in text and "ETA" in text


def test_cxr_predict_reports_an_empty_folder_in_one_line(model_dir, tmp_path, capsys):
    from cxr_search.main import main

    (tmp_path / "empty").mkdir()
    assert main(["predict", str(model_dir), str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("cxr: error: no ")


def test_gradcam_split_reproduces_the_model_and_maps_are_normalised(samples_dir):
    import keras

    from cxr_datasets import preprocess_file
    from cxr_model import ModelConfig, build_model
    from cxr_model.gradcam import gradcam_heatmaps, split_at_layer

    # With augmentation in the model: it must be inactive (identity) when Grad-CAM runs it.
    model = build_model(ModelConfig(image_size=SIZE, weights=None, head_units=(8,), aug_strength=0.5), seed=1)
    x = np.stack([preprocess_file(p, image_size=SIZE) for p in _sample_files(samples_dir)[:3]])[..., None]
    to_conv, from_conv = split_at_layer(model, "block5_conv3")
    conv = to_conv(x)
    assert tuple(conv.shape) == (3, SIZE // 16, SIZE // 16, 512)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(from_conv(conv)), model.predict(x, verbose=0), atol=1e-6)
    heat = gradcam_heatmaps(model, x)
    assert heat.shape == (3, 4, 4) and heat.min() >= 0
    assert set(heat.max(axis=(1, 2)).tolist()) <= {0.0, 1.0}  # each map scaled to its peak (0: no evidence)


@pytest.mark.slow  # make test-slow: test_model_jax runs the JAX path in make test
def test_jax_backend_loads_the_export_predicts_and_gives_the_same_gradcam(model_dir, samples_dir, tmp_path):
    """The export is backend-neutral and the JAX gradient branch agrees with TensorFlow's."""
    from cxr_model.export import load_model
    from cxr_model.gradcam import gradcam_heatmaps
    from cxr_model.predict import predict_paths

    files = [str(p) for p in _sample_files(samples_dir)[:4]]
    expected = predict_paths(model_dir, files)
    model, _ = load_model(model_dir)
    from cxr_datasets import preprocess_file

    x = np.stack([preprocess_file(p, image_size=SIZE) for p in files])[..., None]
    heat_tf = gradcam_heatmaps(model, x)
    script = textwrap.dedent(f"""
        import json, numpy as np, keras
        assert keras.backend.backend() == "jax"
        from cxr_model.export import load_model
        from cxr_model.gradcam import gradcam_heatmaps
        from cxr_model.predict import predict_paths
        from cxr_datasets import preprocess_file
        files = {files!r}
        table = predict_paths({str(model_dir)!r}, files, gradcam_dir={str(tmp_path / "heat")!r})
        x = np.stack([preprocess_file(p, image_size={SIZE}) for p in files])[..., None]
        model, card = load_model({str(model_dir)!r})
        np.save({str(tmp_path / "heat.npy")!r}, gradcam_heatmaps(model, x))
        from cxr_model import TrainConfig, export  # exporting under JAX: every file, SavedModel and ONNX too
        out = export(model, {str(tmp_path / "jax_export")!r}, train_cfg=TrainConfig.from_dict(card["config"]),
                     threshold=card["threshold"], metrics=card["metrics"])
        print(json.dumps(sorted(p.name for p in out.iterdir())))
        print(json.dumps(table["p_pneumonia"].tolist()))
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    *_, listing, probs = done.stdout.strip().splitlines()
    assert json.loads(listing) == ["metrics.json", "model.keras", "model.onnx", "model_card.json", "plots",
                                   "saved_model"]
    assert json.loads((tmp_path / "jax_export" / "model_card.json").read_text())["backend"] == "jax"
    probs_jax = json.loads(probs)
    np.testing.assert_allclose(probs_jax, expected["p_pneumonia"], atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "heat.npy"), heat_tf, atol=1e-3)
    assert len(list((tmp_path / "heat").glob("*.png"))) == len(files)


def test_folders_are_searched_as_prepare_discovers_them(tmp_path):
    """Hidden files, hidden folders and macOS __MACOSX copies below the given folder are skipped."""
    from cxr_model.predict import expand_paths

    for rel in ("a.jpeg", "sub/b.PNG", "__MACOSX/sub/._b.PNG", "__MACOSX/c.jpeg", ".git/d.jpeg",
                "._e.jpeg", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = sorted(p.relative_to(tmp_path).as_posix() for p in expand_paths([tmp_path]))
    assert found == ["a.jpeg", "sub/b.PNG"]
