"""RUN/optuna.db comes from the study the driver holds, never from unpickling a file found in the
storage; and the Tune behaviour that relies on (cxr_search.study_storage) is pinned here."""
from __future__ import annotations

import pickle

import optuna
import pytest

from cxr_search.config import SearchConfig
from cxr_search.study_storage import SweepStudyStorage


class _Planted:
    """Unpickling this writes a marker file: what a bucket writer's searcher-state would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def space(trial):
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)


def _finished_study(storage, name: str, values=(0.7, 0.9)) -> None:
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    for value in values:
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        study.tell(trial, value)


def test_export_writes_the_drivers_study_and_never_unpickles_a_file_in_the_storage(tmp_path):
    from cxr_search.tracking import export_study

    cfg = SearchConfig(prepared=str(tmp_path / "prep"), out=str(tmp_path / "run"), weights=None)
    experiment = tmp_path / "run" / "tune"  # where Tune keeps searcher-state-*.pkl
    assert cfg.experiment_path == str(experiment)
    experiment.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    # the newest searcher state by name, as a bucket writer would plant it
    (experiment / "searcher-state-2099-01-01_00-00-00.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    _finished_study(SweepStudyStorage(cfg.experiment_path), cfg.study_name, values=(0.7, 0.9, 0.8))

    target = export_study(cfg)

    assert not marker.exists()
    study = optuna.load_study(study_name=cfg.study_name, storage=f"sqlite:///{target}")
    assert sorted(t.value for t in study.get_trials()) == [0.7, 0.8, 0.9]


def test_export_without_a_study_in_this_process_writes_nothing(tmp_path):
    from cxr_search.tracking import export_study

    cfg = SearchConfig(prepared=str(tmp_path / "prep"), out=str(tmp_path / "elsewhere"), weights=None)
    assert export_study(cfg) is None
    assert not (tmp_path / "elsewhere" / "optuna.db").exists()


@pytest.mark.parametrize("n_trials", [1, 3])
def test_tunes_optuna_searcher_uses_the_given_storage_and_a_restore_registers_its_copy(tmp_path, n_trials):
    """Pins Ray Tune's OptunaSearch: it creates its study in the storage object it is given (not a
    copy), and `restore` (what Tune calls on --resume, in the driver) unpickles that storage, so the
    restored searcher's storage is the one `live` returns."""
    from ray.tune.search.optuna import OptunaSearch

    sweep = str(tmp_path / "tune")
    given = SweepStudyStorage(sweep)
    searcher = OptunaSearch(space, metric="val_auc", mode="max", storage=given, study_name="cxr-pin")
    for i in range(n_trials):
        assert searcher.suggest(f"t{i}") is not None
        searcher.on_trial_complete(f"t{i}", {"val_auc": 0.5 + i / 10})
    assert SweepStudyStorage.live(sweep) is given
    assert len(optuna.load_study(study_name="cxr-pin", storage=given).trials) == n_trials

    state = tmp_path / "searcher-state.pkl"
    searcher.save(str(state))
    restored = OptunaSearch(space, metric="val_auc", mode="max", storage=SweepStudyStorage(sweep),
                            study_name="cxr-pin")
    restored.restore(str(state))
    live = SweepStudyStorage.live(sweep)
    assert live is not given and live is not None
    values = [t.value for t in optuna.load_study(study_name="cxr-pin", storage=live).trials]
    assert values == pytest.approx([0.5 + i / 10 for i in range(n_trials)])
