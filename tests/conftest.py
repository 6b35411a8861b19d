"""Shared fixtures: real samples, one local Ray instance per test session, a tiny prepared data set.

Everything is built once per session and kept small (32 px, ~120 images) so the fast suite stays
within a few minutes on a 2-core machine.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Quiet TensorFlow and keep every test on the CPU and the default backend unless a test asks.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


DATA_DIR = REPO_ROOT / "tests" / "data"

# `make test-fast` runs `-m 'not slow and not ray and not subprocess'`. A test is marked `ray` when it
# uses a Ray fixture, `subprocess` when its module starts processes (subprocess or sys.executable
# appear in its source): decided here once, so no test file has to remember to mark itself.
_RAY_FIXTURES = {"ray_session", "ray_cluster", "prepared_small", "cluster"}
_RAY_WORDS = ("ray_session", "ray_cluster", "prepared_small", "ray.init", "run_search", "run_sweep",
              "cxr_datasets.prepare", "prepare(", "cli.main", "entry(", "demo(")
_SUBPROCESS_WORDS = ("subprocess", "sys.executable", "Popen")


def pytest_collection_modifyitems(config, items):
    sources: dict[str, str] = {}
    for item in items:
        path = str(item.path)
        if path not in sources:
            sources[path] = Path(path).read_text(encoding="utf-8")
        source = sources[path]
        if _RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or any(w in source for w in _RAY_WORDS):
            item.add_marker(pytest.mark.ray)
        if any(w in source for w in _SUBPROCESS_WORDS):
            item.add_marker(pytest.mark.subprocess)


def _samples_root() -> Path:
    env = os.environ.get("CXR_SAMPLES")
    return Path(env) if env else DATA_DIR / "chest_xray"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The ten real Kermany et al. images (CC BY 4.0), laid out as chest_xray/train/<LABEL>/."""
    root = _samples_root()
    if not root.is_dir():
        pytest.fail(f"real samples not found at {root}: tests/data/ is part of the repo")
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session, always shut down."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    import cxr_datasets

    return Path(cxr_datasets.synth(tmp_path_factory.mktemp("synth"), n=120, seed=0))


@pytest.fixture(scope="session")
def prepared_small(synth_source, ray_session, tmp_path_factory) -> Path:
    import cxr_datasets

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    cxr_datasets.prepare(synth_source, out, image_size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def exported_64(tmp_path_factory) -> Path:
    """An exported 64-px model (random seeded weights, threshold 0.5): block5_conv3 is then 4 x 4,
    enough to see a Grad-CAM heatmap's shape. For predict and serve, which only read it."""
    from cxr_model import ModelConfig, TrainConfig, build_model, export
    from cxr_model.evaluate import metrics_from_probs

    cfg = TrainConfig(model=ModelConfig(image_size=64, weights=None, head_units=(8,), aug_strength=0.1))
    metrics = metrics_from_probs([0, 1, 0, 1], [0.2, 0.6, 0.4, 0.9], threshold=0.5, n_boot=50)
    return export(build_model(cfg.model, seed=0), tmp_path_factory.mktemp("m") / "model", train_cfg=cfg,
                  threshold=0.5, metrics=metrics, threshold_method="youden", resize="pad")


@pytest.fixture(scope="module")
def ray_cluster():
    """A real multi-node Ray on this machine (tests/ray_cluster.py): a head with no CPUs and the
    dashboard, two 1-CPU worker nodes; every node stopped by process id after the module."""
    from ray_cluster import ray_cluster as start_cluster

    with start_cluster(workers=2, cpus_per_worker=1) as cluster:
        yield cluster
