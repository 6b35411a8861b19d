"""The one place cxr-tune relies on Ray internals, each where Ray 2.60 has no public equivalent.
tests/test_ray_adapter.py pins every behaviour used here, so an upgrade that changes one fails
there, by name, instead of silently elsewhere.

- `set_restored_callbacks`: `Tuner.restore` takes no RunConfig, so a restored sweep would keep
  the callbacks the interrupted driver pickled (a dead driver's kill switch, its MLflow logger).
  The restored Tuner's run config is replaced in place.
- Logger names: Ray logs through module-named loggers; a few lines per trial or per start are
  quietened by name.
- `validate_cluster_config`: what `ray up` checks a cluster-launcher YAML with, without
  launching anything (the tests of cluster.yaml and cluster/gcp.yaml use it).
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


def validate_cluster_config(config: dict) -> dict:
    """`config` (a cluster-launcher YAML, loaded) as Ray fills in its defaults, after Ray's own
    schema validation; raises what `ray up` would raise for it."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared
