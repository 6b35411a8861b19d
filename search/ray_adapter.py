"""The one place cxr-tune relies on Ray internals, each where Ray 2.60 has no public equivalent.
tests/test_ray_adapter.py pins every behaviour used here, so an upgrade that changes one fails
there, by name, instead of silently elsewhere.

- `set_restored_callbacks`: `Tuner.restore` takes no RunConfig, so a restored sweep would keep
  the callbacks the interrupted driver pickled (a dead driver's kill switch, its MLflow logger).
  The restored Tuner's run config is replaced in place.
- Logger names: Ray logs through module-named loggers; a few lines per trial or per start are
  quietened by name.
"""
from __future__ import annotations

from typing import Any

# "Checkpoint successfully created" once per improving epoch of every trial.
CHECKPOINT_LOGGER = "ray.train._internal.storage"


def set_restored_callbacks(tuner, callbacks: list[Any] | None) -> bool:
    """Give a Tuner from `Tuner.restore` this driver's callbacks. False with Ray Client, where
    the tuner runs on the cluster and keeps the saved ones."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None:
        return False
    local._run_config.callbacks = callbacks
    return True
