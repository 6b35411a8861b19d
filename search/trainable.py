"""The Tune trainable: one trial = one `cxr_model.fit` of one sampled configuration.

The path of one trial, in the order it runs (`train_trial` below reads the same way):
1. Tune's Optuna searcher samples `config` from the space (search/space.py, `SpaceSampler`).
2. `train_trial` sets up the process (backend, threads, GPU check), reads the trial's last
   checkpoint if it is a retry (`ResumeState`, search/checkpoint.py) and turns `config` plus the
   sweep's `settings` into a `TrainConfig` (`to_train_config`).
3. `cxr_model.fit` trains it: on cached frozen features when the base is fixed, else end to end.
4. After every epoch `ReportCallback` (search/trial_reporter.py) reports the best-so-far val AUC
   to Tune (ASHA and Optuna read it) and, when it improved, a checkpoint with the full model's
   weights, the optimizer's state and the history.
With `--cv K` step 2 hands over to search/cv_trial.py after the set-up: K fits, one per fold; fold
1 reports every epoch (ASHA's early rungs), then one report per completed fold (the mean best val
AUC of the folds so far) with a checkpoint of every completed fold's model.

A plain function, as in Ray Tune's own examples. Keras, TensorFlow/JAX and cxr_model are imported
inside it, after the accelerator settings are in the environment, because a GPU runtime reads
them once, at import. The driver hands it a reference to the prepared arrays, which a Ray task
loaded into the object store (`tune.with_parameters`, search/shared_data.py), so no trial reads or
decodes an image file.

Start-up is amortised by keeping trial processes alive (`reuse_actors=True` in search/tuner.py):
the second trial in a worker finds Keras imported, the backend initialised and, for frozen-base
trials, the VGG16 features already in this process's memory (`_FEATURE_CACHES`). On JAX, XLA
programs go to a node-local persistent compilation cache, so a trial whose architecture and batch
size an earlier trial on the node already compiled skips most of the compilation.
"""
from __future__ import annotations

import logging
import os
import platform
import stat
import sys
import tempfile
from typing import Any

from cxr_datasets.errors import CxrError
from cxr_model.quiet import init_tensorflow_quietly
from cxr_search.space import to_train_config

# How long a reused worker waits for the previous trial's training thread to end before it takes
# the next trial. Tune stops a trial (ASHA, or its last epoch) by raising SystemExit inside that
# trial's `tune.report`, but only when the worker is handed its next trial
# (FunctionTrainable.reset_config). The exception then unwinds through Keras' fit and frees the
# model, its optimizer and compiled functions; on a busy node that takes more than Ray's default
# of 2 s, reset_config returns False, and Tune fails the NEXT trial, one that never ran, with
# "Trainable runner reuse requires reset_config() to be implemented and return True". Read by Ray
# in this process at every reset, so setting it in the trial is enough.
THREAD_JOIN_TIMEOUT_S = "120"

# Per-process feature caches, keyed by cache folder. They outlive a trial on purpose: with
# reuse_actors the next trial in this worker process reuses the features without touching disk.
_FEATURE_CACHES: dict[str, Any] = {}


def train_trial(config: dict[str, Any], data, settings: dict[str, Any]) -> None:
    """Train `config` for up to settings["max_epochs"] epochs, reporting to Tune after each epoch.

    data: a `SharedData` (search/shared_data.py) of a `cxr_model.Data` (train + validation only:
    the test split never reaches a trial), or with `--cv K` of a `cxr_search.folds.CVPool` (train +
    val pooled, each image's fold).
    settings: the sweep-wide values from `trial_settings()` (image size, weights, budget, ...).
    """
    # Before anything else: the worker's next reset reads it (see THREAD_JOIN_TIMEOUT_S).
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = THREAD_JOIN_TIMEOUT_S
    _configure_process(settings)

    init_tensorflow_quietly()  # before Keras: no TensorFlow start-up noise in the trial's log
    check_gpu(settings)  # before any training: a trial that asked for a GPU never trains on the CPU

    from ray import tune

    from cxr_model import fit
    from cxr_model.train import uses_feature_cache
    from cxr_search.ray_adapter import CHECKPOINT_LOGGER
    from cxr_search.trial_reporter import ReportCallback, ResumeState

    # One "Checkpoint successfully created" line per improving epoch would drown Tune's status.
    logging.getLogger(CHECKPOINT_LOGGER).setLevel(logging.WARNING)
    arrays = data.get()  # zero-copy views of the object store's copy
    cache_dir = settings["feature_cache_dir"] or _node_local("cxr-tune-features")
    if settings.get("cv"):  # `--cv K`: K fits, one report per fold (search/cv_trial.py)
        from cxr_search.cv_trial import train_cv_trial

        train_cv_trial(config, arrays, settings, _feature_cache(cache_dir))
        return
    resume = ResumeState.from_checkpoint(tune.get_checkpoint())
    remaining = settings["max_epochs"] - resume.epochs_done
    if remaining <= 0:  # restored after its last epoch was checkpointed: nothing left to train
        return
    train_cfg = to_train_config(config, image_size=settings["image_size"], weights=settings["weights"],
                                epochs=remaining, seed=settings["seed"], patience=settings["patience"],
                                use_feature_cache=settings["use_feature_cache"])
    on_features = uses_feature_cache(train_cfg)
    cache = _feature_cache(cache_dir) if on_features else None
    callback = ReportCallback(resume=resume, train_cfg=train_cfg, feature_cache=on_features)
    fit(train_cfg, arrays, callbacks=[callback], feature_cache=cache)


# The start of the one line a trial fails with when it asked for a GPU and its backend sees none;
# the driver looks for it to stop the sweep instead of retrying (search/tuner.py).
GPU_CHECK_FAILED = "GPU check failed"


class GpuNotVisible(RuntimeError):
    pass


def check_gpu(settings: dict[str, Any]) -> None:
    """With a GPU share per trial, fail at once, in one line, when the Keras backend sees no GPU.

    Ray gives the trial its GPU share and sets CUDA_VISIBLE_DEVICES, but whether the backend can
    use it depends on the node's software (a CPU-only jax or tensorflow wheel, a driver mismatch):
    without this check such a trial silently trains on the CPU, many times slower.
    """
    if not settings["gpus_per_trial"]:
        return
    backend = settings["keras_backend"]
    devices = visible_devices(backend)
    if any(kind == "gpu" for kind, _ in devices):
        return

    seen = ", ".join(name for _, name in devices) or "no devices"
    raise GpuNotVisible(
        f"{GPU_CHECK_FAILED}: --gpus-per-trial {settings['gpus_per_trial']:g}, but the {backend} backend on "
        f"node {platform.node()} sees no GPU, only {seen} "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
        f"install the GPU build of {backend} on every GPU node, or run with --gpus-per-trial 0")


def visible_devices(backend: str) -> list[tuple[str, str]]:
    """[(kind, name)] of the devices `backend` can compute on; kind is "gpu", "cpu" or "tpu"."""
    if backend == "jax":
        import jax

        return [("gpu" if d.platform in ("gpu", "cuda", "rocm") else d.platform, f"{d.platform}:{d.id}")
                for d in jax.devices()]
    if backend == "torch":
        import torch

        count = torch.cuda.device_count()
        return [("gpu", f"cuda:{i}") for i in range(count)] or [("cpu", "cpu")]
    import tensorflow as tf

    return [(d.device_type.lower(), d.name.replace("/physical_device:", "")) for d in tf.config.list_physical_devices()]


def trial_settings(*, image_size: int, weights: str | None, max_epochs: int, seed: int,
                   patience: int, cpus_per_trial: float, gpus_per_trial: float,
                   feature_cache_dir: str | None, use_feature_cache: bool = True, cv: int = 0) -> dict[str, Any]:
    """The sweep-wide part of every trial, as a plain dict (it travels to remote workers)."""
    return {
        "cv": cv,  # 0: one validation split; K: the trial cross-validates over the pool's K folds
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
    """This user's private folder `<name>-<uid>` under this node's temp directory (evaluated in the
    trial, not the driver): made with mode 0700, and refused in one line if it is a link, is not
    this user's, or others may write or read it. A shared /tmp is anyone's: a predictable folder
    there could be planted by another user, with links pointing to their files."""


    path = os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise CxrError(f"{path} is not a private folder of this user (a link, another owner, or mode "
                       f"{stat.S_IMODE(info.st_mode):o}, not 700): remove it, or give --feature-cache-dir")
    return path


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
