"""Pins what search/ray_adapter.py relies on in the Ray version this project locks: if an
upgrade changes it, these fail by name."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from ray import tune

from cxr_search.ray_adapter import CHECKPOINT_LOGGER, DriverCallbacks


class _Mark(tune.Callback):
    """Writes `<folder>/<name>` when a trial completes (callbacks are pickled with the run config)."""

    def __init__(self, folder: str, name: str):
        self.folder, self.name = folder, name

    def on_trial_complete(self, iteration, trials, trial, **info):
        (Path(self.folder) / self.name).write_text(trial.trial_id)


@pytest.mark.timeout(300)
def test_a_restored_tuner_runs_with_the_callbacks_it_is_given(ray_session, tmp_path):
    def _fails_once(config):  # defined here: Ray pickles it by value (the tests folder is no package)
        marker = Path(config["folder"]) / "tried"
        if not marker.exists():
            marker.write_text("1")
            raise RuntimeError("first attempt fails")
        tune.report({"score": 1.0})

    storage = tmp_path / "storage"
    run_config = tune.RunConfig(name="pin", storage_path=str(storage),
                                callbacks=DriverCallbacks.use([_Mark(str(tmp_path), "old")]),
                                failure_config=tune.FailureConfig(max_failures=0), verbose=0)
    grid = tune.Tuner(_fails_once, param_space={"folder": str(tmp_path)}, run_config=run_config).fit()
    assert grid.errors  # the one trial errored: something for the restored tuner to run
    (tmp_path / "old").unlink(missing_ok=True)

    DriverCallbacks.use([_Mark(str(tmp_path), "new")])  # what a new driver does before restoring
    tuner = tune.Tuner.restore(str(storage / "pin"), trainable=_fails_once, resume_errored=True)
    grid = tuner.fit()

    assert not grid.errors, repr(grid.errors[0])[:3000]
    assert grid[0].metrics["score"] == 1.0
    assert (tmp_path / "new").exists()      # this driver's callback ran
    assert not (tmp_path / "old").exists()  # the pickled one did not


def test_the_quietened_logger_names_a_module_ray_has():
    assert importlib.util.find_spec(CHECKPOINT_LOGGER) is not None
