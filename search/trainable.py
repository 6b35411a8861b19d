"""The Tune trainable: one trial = one `cxr_model.fit` of one sampled configuration.

A plain function, as in Ray Tune's own examples. Keras, TensorFlow/JAX and cxr_model are imported
inside it, after the accelerator settings are in the environment, because a GPU runtime reads
them once, at import. The driver hands it the prepared arrays through Ray's object store
(`tune.with_parameters`), so no trial reads or decodes an image file.

Start-up is amortised by keeping trial processes alive (`reuse_actors=True` in search/tuner.py):
the second trial in a worker finds Keras imported, the backend initialised and, for frozen-base
trials, the VGG16 features already in this process's memory (`_FEATURE_CACHES`). On JAX, XLA
programs go to a node-local persistent compilation cache, so a trial whose architecture and batch
size an earlier trial on the node already compiled skips most of the compilation.
"""
from __future__ import annotations

import os
import sys
from typing import Any

# Per-process feature caches, keyed by cache folder. They outlive a trial on purpose: with
# reuse_actors the next trial in this worker process reuses the features without touching disk.
_FEATURE_CACHES: dict[str, Any] = {}


def train_trial(config: dict[str, Any], data, settings: dict[str, Any]) -> None:
    """Train `config` for up to settings["max_epochs"] epochs, reporting to Tune after each epoch.

    data: a `cxr_model.Data` (train + validation only: the test split never reaches a trial).
    settings: the sweep-wide values from `trial_settings()` (image size, weights, budget, ...).
    """
    _configure_process(settings)
    import logging

    from ray import tune

    from cxr_model import fit
    from cxr_model.train import uses_feature_cache
    from search.trial_reporter import ReportCallback, ResumeState
    from search.space import to_train_config

    # One "Checkpoint successfully created" line per improving epoch would drown Tune's status.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    resume = ResumeState.from_checkpoint(tune.get_checkpoint())
    remaining = settings["max_epochs"] - resume.epochs_done
    if remaining <= 0:  # restored after its last epoch was checkpointed: nothing left to train
        return
    train_cfg = to_train_config(config, image_size=settings["image_size"], weights=settings["weights"],
                                epochs=remaining, seed=settings["seed"], patience=settings["patience"],
                                use_feature_cache=settings["use_feature_cache"])
    on_features = uses_feature_cache(train_cfg)
    cache_dir = settings["feature_cache_dir"] or _node_local("cxr-tune-features")
    cache = _feature_cache(cache_dir) if on_features else None
    callback = ReportCallback(resume=resume, train_cfg=train_cfg, feature_cache=on_features)
    fit(train_cfg, data, callbacks=[callback], feature_cache=cache)


def trial_settings(*, image_size: int, weights: str | None, max_epochs: int, seed: int,
                   patience: int, cpus_per_trial: float, gpus_per_trial: float,
                   feature_cache_dir: str | None, use_feature_cache: bool = True) -> dict[str, Any]:
    """The sweep-wide part of every trial, as a plain dict (it travels to remote workers)."""
    return {
        "image_size": image_size,
        "weights": weights,
        "max_epochs": max_epochs,
        "seed": seed,
        "patience": patience,
        "use_feature_cache": use_feature_cache,
        "cpus_per_trial": cpus_per_trial,
        "gpus_per_trial": gpus_per_trial,
        # The driver's backend wins over whatever the worker nodes' shells export.
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        # None: a node-local folder, resolved on the worker (its TMPDIR may differ from the
        # driver's): every node computes the features once and its trials share them (the
        # cache's file lock keeps concurrent trials from computing them twice).
        "feature_cache_dir": feature_cache_dir,
    }


def _node_local(name: str) -> str:
    """A folder under this node's temp directory (evaluated in the trial, not the driver)."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), name)


def _configure_process(settings: dict[str, Any]) -> None:
    """Accelerator and threading settings; they only take effect before Keras' backend is imported."""
    if "keras" in sys.modules:  # a reused worker: already configured by its first trial
        return
    os.environ["KERAS_BACKEND"] = settings["keras_backend"]
    # Trials sharing a GPU (0.25 each) must allocate what they use, not grab the whole card:
    # JAX preallocates 75% of GPU memory by default and TensorFlow maps it all.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if settings["keras_backend"] == "jax":
        # JAX's persistent compilation cache, node-local: trials with the same architecture and
        # batch size compile the same XLA programs; all but the first on a node load them instead
        # (a new Keras model means new jitted functions, even in a reused process).
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _node_local("cxr-tune-jax-cache"))
    if not settings["gpus_per_trial"]:
        # On CPUs, concurrent trials would each start one thread per core and thrash; give each
        # the cores Ray reserved for it (Ray already sets OMP_NUM_THREADS the same way).
        threads = max(1, int(settings["cpus_per_trial"]))
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
        if threads == 1:  # JAX on CPU has no thread-count setting, only on/off for Eigen's pool
            os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")


def _feature_cache(cache_dir: str):
    from cxr_model import FeatureCache

    if cache_dir not in _FEATURE_CACHES:
        _FEATURE_CACHES[cache_dir] = FeatureCache(cache_dir=cache_dir)
    return _FEATURE_CACHES[cache_dir]
