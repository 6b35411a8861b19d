"""Shared fixtures: real samples, one local Ray instance per test session, a tiny prepared data set.

Everything is built once per session and kept small (32 px, ~120 images) so the fast suite stays
within a few minutes on a 2-core machine. `make test` runs the test files on two pytest-xdist
workers (each its own session and Ray); the data fixtures are built once for both (`_built_once`).
"""
from __future__ import annotations

import os
import shutil
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


# The longest files (2026-12-03, `make test`'s --durations), run first: pytest-xdist hands out
# whole files in collection order, so starting with the longest keeps one worker from finishing
# a long file alone at the end. A stale list only costs balance, never a result.
_LONGEST_FIRST = ("test_search_sweep.py", "test_search_resume.py", "test_cluster_jobs.py", "test_serve.py",
                  "test_search_cv.py", "test_model_jax.py", "test_search_cv_resume.py", "test_datasets_prepare.py")


def pytest_collection_modifyitems(config, items):
    order = {name: rank for rank, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest keep their order
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


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once per `make test` for all xdist workers, under a file lock in their
    shared base temp folder (the pattern pytest-xdist documents); once per session without xdist.
    The fixtures that use it only read what it built."""
    from filelock import FileLock  # a dependency of Ray's

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of one run
    folder = base / f"shared-{name}"
    built = base / f"shared-{name}.built"  # beside it: a synthetic source must hold only its images
    with FileLock(str(folder) + ".lock"):
        if not built.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    import cxr_datasets

    return _built_once(tmp_path_factory, "synth", lambda folder: cxr_datasets.synth(folder, n=120, seed=0))


@pytest.fixture(scope="session")
def prepared_small(synth_source, ray_session, tmp_path_factory) -> Path:
    import cxr_datasets

    def build(folder):
        cxr_datasets.prepare(synth_source, folder / "prepared", image_size=32, seed=0)

    return _built_once(tmp_path_factory, "prepared", build) / "prepared"


@pytest.fixture(scope="session")
def exported_64(tmp_path_factory) -> Path:
    """An exported 64-px model (random seeded weights, threshold 0.5): block5_conv3 is then 4 x 4,
    enough to see a Grad-CAM heatmap's shape. For predict and serve, which only read it: model.keras
    alone (the SavedModel/ONNX conversion is tested on the sweep's export and in test_export_portable)."""
    def build(folder):
        from cxr_model import ModelConfig, TrainConfig, build_model, export
        from cxr_model.evaluate import metrics_from_probs

        cfg = TrainConfig(model=ModelConfig(image_size=64, weights=None, head_units=(8,), aug_strength=0.1))
        metrics = metrics_from_probs([0, 1, 0, 1], [0.2, 0.6, 0.4, 0.9], threshold=0.5, n_boot=50)
        export(build_model(cfg.model, seed=0), folder / "model", train_cfg=cfg, threshold=0.5, metrics=metrics,
               threshold_method="youden", resize="pad", formats=("keras",))

    return _built_once(tmp_path_factory, "exported_64", build) / "model"


@pytest.fixture(scope="module")
def ray_cluster():
    """A real multi-node Ray on this machine (tests/ray_cluster.py): a head with no CPUs and the
    dashboard, two 1-CPU worker nodes; every node stopped by process id after the module."""
    from ray_cluster import ray_cluster as start_cluster

    with start_cluster(workers=2, cpus_per_worker=1) as cluster:
        yield cluster
