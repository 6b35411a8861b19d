"""The same model code under KERAS_BACKEND=jax (how it runs on the GPU machines), in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from cxr_model import Data, ModelConfig, TrainConfig, fit, predict_proba

    assert keras.backend.backend() == "jax"
    out_dir, runs = sys.argv[1], json.loads(sys.argv[2])
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 16)
    x = rng.integers(0, 80, (32, 32, 32, 1)).astype(np.uint8)
    x[y == 1, 10:22, 10:22] += 120
    data = Data(x[:24], y[:24], x[24:], y[24:])
    out = {}
    for name, aug, cache in runs:
        cfg = TrainConfig(model=ModelConfig(image_size=32, weights=None, head_units=(8,),
                                            head_pooling="avg", aug_strength=aug),
                          lr=1e-3, batch_size=8, epochs=2, use_feature_cache=cache)
        history = fit(cfg, data)
        out[name] = {"val_auc": history.history["val_auc"],
                     "probs": predict_proba(history.model, data.x_val).tolist()}
        history.model.save(f"{out_dir}/{name}.keras")
        reloaded = keras.saving.load_model(f"{out_dir}/{name}.keras", safe_mode=True)
        out[name]["reloaded_probs"] = predict_proba(reloaded, data.x_val).tolist()
    print("RESULT " + json.dumps(out))
""")


def _run_under_jax(runs, tmp_path, repo_root) -> dict:
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(runs)],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_build_fit_predict_save_load_under_jax(tmp_path, repo_root):
    # the augmentation layer inside a jitted train step, and the feature-cache path
    out = _run_under_jax([["augmented", 0.3, False], ["cached", 0.0, True]], tmp_path, repo_root)
    for name in ("augmented", "cached"):
        assert len(out[name]["val_auc"]) == 2
        assert out[name]["reloaded_probs"] == pytest.approx(out[name]["probs"], abs=1e-6)


@pytest.mark.slow
def test_feature_cache_equals_end_to_end_under_jax(tmp_path, repo_root):
    out = _run_under_jax([["cached", 0.0, True], ["direct", 0.0, False]], tmp_path, repo_root)
    assert out["cached"]["probs"] == pytest.approx(out["direct"]["probs"], abs=1e-4)
