"""The exported model is used with no cxr-tune code: plain Keras in safe mode (TensorFlow and JAX),
plain TensorFlow (SavedModel) and onnxruntime (ONNX) all give `cxr predict`'s probabilities.

"No cxr-tune code" is enforced, not assumed: the checks run in a child Python started with `-I -S`
(no user site, no .pth files, so not even the editable install's import hook), with only the
virtual environment's site-packages on sys.path and the export copied to a temporary folder as the
working directory; the child asserts that `cxr_model`, `datasets` and `search` cannot be imported.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SIZE = 32  # the size of the `prepared_small` fixture
TOL = 1e-5


@pytest.fixture(scope="module")
def trained(prepared_small, tmp_path_factory):
    """(export folder, training-graph model): a 32-px model WITH an augmentation layer in its training
    graph, exported by the real finalize() (threshold and operating points on val, test once)."""
    from cxr_model import ModelConfig, TrainConfig, build_model
    from cxr_model.finalize import finalize

    cfg = TrainConfig(model=ModelConfig(image_size=SIZE, weights=None, head_units=(8,), aug_strength=0.3, hflip=True))
    model = build_model(cfg.model, seed=0)
    assert any(type(layer).__name__ == "XrayAugment" for layer in model.layers)
    out = tmp_path_factory.mktemp("portable") / "model"
    finalize(model, cfg, prepared_small, out, n_boot=100)
    return out, model


@pytest.fixture(scope="module")
def prepared_test(prepared_small):
    """(images [N, S, S, 1] uint8, absolute source paths) of the prepared test split."""
    import cxr_datasets

    images, _, meta = cxr_datasets.load(prepared_small, "test")
    source = Path(cxr_datasets.read_manifest(prepared_small)["source"])
    return images, [str(source / p) for p in meta["source_path"]]


@pytest.fixture(scope="module")
def cxr_predict(trained, prepared_test, tmp_path_factory):
    """P(PNEUMONIA) per file from the `cxr predict` command on the prepared test split's source files."""
    from cxr_search.main import main

    _, paths = prepared_test
    csv = tmp_path_factory.mktemp("pred") / "preds.csv"
    assert main(["predict", str(trained[0]), *paths, "--out", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert table["error"].isna().all()
    return dict(zip(table["path"], table["p_pneumonia"]))


def run_clean(script: str, workdir: Path, backend: str) -> str:
    """Run `script` in a Python that cannot see cxr-tune, with cwd `workdir`; returns its stdout."""
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    guard = textwrap.dedent(f"""
        import sys, importlib.util
        sys.path.extend({site_dirs!r})  # the packages only: -S skipped every .pth file
        for name in ("cxr_model", "datasets", "search"):
            assert importlib.util.find_spec(name) is None, name + " is importable"
        assert {str(Path(__file__).resolve().parents[1])!r} not in sys.path and "" not in sys.path
    """)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", guard + textwrap.dedent(script)], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


CLEAN_SCRIPT = """
    import numpy as np, keras
    assert keras.backend.backend() == "{backend}"
    x = np.load("x.npy")
    model = keras.saving.load_model("model/model.keras", safe_mode=True)
    np.save("keras.npy", model.predict(x, verbose=0))
    import onnxruntime as ort
    session = ort.InferenceSession("model/model.onnx")
    assert [i.name for i in session.get_inputs()] == ["image"], session.get_inputs()
    np.save("onnx.npy", session.run(None, {{"image": x}})[0])
    if "{backend}" == "tensorflow":
        import tensorflow as tf
        loaded = tf.saved_model.load("model/saved_model")
        np.save("tf.npy", loaded.serve(tf.constant(x)).numpy())
        signature = loaded.signatures["serving_default"]
        np.save("tf_sig.npy", list(signature(image=tf.constant(x)).values())[0].numpy())
"""


def _copy_out(export_dir: Path, workdir: Path, images: np.ndarray) -> None:
    shutil.copytree(export_dir, workdir / "model")
    np.save(workdir / "x.npy", images)


def test_model_keras_holds_only_builtin_keras_classes(trained):
    with zipfile.ZipFile(trained[0] / "model.keras") as archive:
        config = archive.read("config.json").decode()
    assert "XrayAugment" not in config and "VGGPreprocess" not in config and "cxr_model" not in config
    modules = {v for k, v in _walk(json.loads(config)) if k == "module"}
    assert modules and all(m.startswith("keras") for m in modules), modules


def _walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_plain_keras_tensorflow_and_onnxruntime_match_cxr_predict(trained, prepared_test, cxr_predict, tmp_path):
    export_dir, training_model = trained
    images, paths = prepared_test
    _copy_out(export_dir, tmp_path, images)
    run_clean(CLEAN_SCRIPT.format(backend="tensorflow"), tmp_path, "tensorflow")
    keras_p = np.load(tmp_path / "keras.npy")
    expected = np.array([cxr_predict[p] for p in paths])
    assert keras_p.shape == (len(paths), 2)
    np.testing.assert_allclose(keras_p[:, 1], expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(keras_p.sum(axis=1), 1.0, atol=1e-5)
    for name in ("onnx", "tf", "tf_sig"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), keras_p, atol=TOL, rtol=0, err_msg=name)
    # The training graph (augmentation included; inactive at inference) gives the same numbers.
    np.testing.assert_allclose(training_model.predict(images, verbose=0), keras_p, atol=1e-6, rtol=0)
    assert len(set(np.round(expected, 4))) > 1  # the images really differ in their outputs


def test_plain_keras_on_jax_loads_the_same_file(trained, prepared_test, cxr_predict, tmp_path):
    images, paths = prepared_test
    _copy_out(trained[0], tmp_path, images)
    run_clean(CLEAN_SCRIPT.format(backend="jax"), tmp_path, "jax")
    expected = np.array([cxr_predict[p] for p in paths])
    np.testing.assert_allclose(np.load(tmp_path / "keras.npy")[:, 1], expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy")[:, 1], expected, atol=TOL, rtol=0)


def test_card_lists_every_model_file_with_its_sha256_input_spec_and_threshold(trained):
    import hashlib

    export_dir = trained[0]
    card = json.loads((export_dir / "model_card.json").read_text())
    artifacts = {a["path"]: a for a in card["files"]["artifacts"]}
    assert {"model.keras", "model.onnx", "saved_model/saved_model.pb"} <= set(artifacts)
    on_disk = {str(p.relative_to(export_dir)) for p in export_dir.rglob("*")
               if p.is_file() and (p.name.startswith("model.") or "saved_model" in p.parts)}
    assert on_disk == set(artifacts)  # every model file listed, nothing listed that is not there
    for path, entry in artifacts.items():
        data = (export_dir / path).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data), path
    assert card["model_sha256"] == artifacts["model.keras"]["sha256"]
    assert card["input_spec"] == {"name": "image", "shape": [None, SIZE, SIZE, 1], "dtype": "uint8",
                                  "layout": "NHWC", "values": card["input_spec"]["values"]}
    assert 0 < card["threshold"] < 1 and card["schema_version"] == 2
    assert [op["name"] for op in card["operating_points"]] == ["sens>=0.95", "sens>=0.9", "spec>=0.9"]


EXPORT_ON_JAX = """
import json, sys, numpy as np, keras
assert keras.backend.backend() == "jax"
from cxr_model import ModelConfig, TrainConfig, build_model, export
from cxr_model.evaluate import metrics_from_probs
cfg = TrainConfig(model=ModelConfig(image_size=32, weights=None, head_units=(8,), aug_strength=0.2))
model = build_model(cfg.model, seed=3)
x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
np.save(sys.argv[1] + "/x.npy", x)
np.save(sys.argv[1] + "/jax.npy", model.predict(x, verbose=0))
metrics = metrics_from_probs([0, 1, 0, 1], [0.2, 0.6, 0.4, 0.9], threshold=0.5, n_boot=20)
export(model, sys.argv[1] + "/model", train_cfg=cfg, threshold=0.5, metrics=metrics)
print(json.loads(open(sys.argv[1] + "/model/model_card.json").read())["backend"])
"""


@pytest.mark.slow  # make test-slow: test_model_jax exports under JAX in make test
@pytest.mark.timeout(600)
def test_an_export_made_on_jax_has_a_saved_model_and_onnx_that_match(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", EXPORT_ON_JAX, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "jax"
    assert (tmp_path / "model" / "saved_model" / "saved_model.pb").is_file()
    run_clean(CLEAN_SCRIPT.format(backend="tensorflow"), tmp_path, "tensorflow")
    on_jax = np.load(tmp_path / "jax.npy")
    for name in ("keras", "onnx", "tf", "tf_sig"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), on_jax, atol=TOL, rtol=0, err_msg=name)
