"""The one place cxr-tune depends on how Ray behaves beyond its documented API, each where Ray
2.60 offers nothing public. tests/test_ray_adapter.py pins every behaviour used here, so an
upgrade that changes one fails there, by name, instead of silently elsewhere.

- `DriverCallbacks`: `Tuner.restore` takes no RunConfig, so a restored sweep would run the
  callbacks the interrupted driver pickled (a dead driver's kill switch, its MLflow logger). The
  run config holds one stateless `DriverCallbacks` instead, a public `tune.Callback` that forwards
  every hook to the callbacks the current driver set with `use()`: pickled and restored, it still
  reaches this driver's own.
- Logger names: Ray logs through module-named loggers; a few lines per trial or per start are
  quietened by name.
- `validate_cluster_config`: what `ray up` checks a cluster-launcher YAML with, without
  launching anything (the tests of cluster.yaml and cluster/gcp.yaml use it).
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

from ray import tune

# "Checkpoint successfully created" once per improving epoch of every trial.
CHECKPOINT_LOGGER = "ray.train._internal.storage"

_HOOKS = ("setup", "on_step_begin", "on_step_end", "on_trial_start", "on_trial_restore", "on_trial_save",
          "on_trial_result", "on_trial_complete", "on_trial_recover", "on_trial_error", "on_checkpoint",
          "on_experiment_end")


class DriverCallbacks(tune.Callback):
    """Forwards Tune's callback hooks to this driver's callbacks (`DriverCallbacks.use`)."""

    _current: ClassVar[list[Any]] = []

    @classmethod
    def use(cls, callbacks) -> list[DriverCallbacks]:
        """Make `callbacks` the ones every DriverCallbacks forwards to; returns the run config's
        callback list (empty when there are none)."""
        cls._current = list(callbacks or ())
        return [cls()] if cls._current else []


def _forwarder(name: str):
    def forward(self, *args, **kwargs):
        for callback in DriverCallbacks._current:
            getattr(callback, name)(*args, **kwargs)
    forward.__name__ = name
    return forward


for _name in _HOOKS:
    setattr(DriverCallbacks, _name, _forwarder(_name))


def validate_cluster_config(config: dict) -> dict:
    """`config` (a cluster-launcher YAML, loaded) as Ray fills in its defaults, after Ray's own
    schema validation; raises what `ray up` would raise for it."""

    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared
