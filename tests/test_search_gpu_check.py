"""--gpus-per-trial > 0 on a node whose Keras backend sees no GPU: the trial fails at once with one
line (which backend, what it sees), never trains on the CPU, and the sweep stops instead of
retrying it. Run here on a CPU machine through a Ray that claims one GPU (`num_gpus=1`), so Tune
schedules the trial exactly as on a GPU node whose jax/tensorflow cannot use the card."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_search_resume import end_ray_processes
from test_search_sweep import TEST_SPACE

REPO = Path(__file__).resolve().parents[1]


def _settings(gpus: float) -> dict:
    from cxr_search.trainable import trial_settings

    return trial_settings(image_size=32, weights=None, max_epochs=1, seed=0, patience=1, cpus_per_trial=1,
                          gpus_per_trial=gpus, feature_cache_dir=None)


def test_check_names_the_backend_and_what_it_sees():
    from cxr_search.trainable import GPU_CHECK_FAILED, GpuNotVisible, check_gpu, visible_devices

    check_gpu(_settings(0.0))  # no GPU asked for: nothing to check
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    assert not any(kind == "gpu" for kind, _ in visible_devices(backend))  # this machine has none
    with pytest.raises(GpuNotVisible) as info:
        check_gpu(_settings(0.25))
    line = str(info.value)
    assert "\n" not in line and line.startswith(GPU_CHECK_FAILED)
    assert f"the {backend} backend" in line and "sees no GPU, only CPU:0" in line and "--gpus-per-trial 0.25" in line


DRIVER = """
import sys, ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)  # a GPU Tune can schedule, none the backend sees
from cxr_search.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # make test-slow: check_gpu's unit tests stay in make test
@pytest.mark.timeout(300)
def test_sweep_on_a_gpu_its_backend_cannot_see_stops_with_one_line(prepared_small, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(TEST_SPACE)
    run = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="cxr12g-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, KERAS_BACKEND="tensorflow")
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, "search", str(prepared_small), "--out", str(run), "--trials", "4",
             "--max-epochs", "2", "--concurrency", "2", "--weights", "none", "--gpus-per-trial", "0.5",
             "--max-failures", "2", "--space", str(space), "--quiet"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    finally:
        end_ray_processes(ray_tmp)
    output = proc.stdout + proc.stderr
    (tmp_path / "driver.log").write_text(output)
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cxr: error:")]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith("cxr: error: GPU check failed: --gpus-per-trial 0.5, but the tensorflow backend")
    assert "sees no GPU, only CPU:0 (CUDA_VISIBLE_DEVICES=0)" in errors[0]
    # stopped at the first failure: no retry, no other trial started, nothing trained (no report)
    assert output.count("Trial task failed") <= 1 and "GpuNotVisible" in output
    assert not list(run.glob("tune/trial_*/checkpoint_*"))
