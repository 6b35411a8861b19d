"""The sweep's Optuna study, held in memory by the driver that runs it, found again without
reading any file.

Without --optuna-storage the study lives in Ray Tune's OptunaSearch, which Tune pickles into the
experiment folder with every snapshot (searcher-state-*.pkl) and unpickles on `--resume`. After
the sweep, RUN/optuna.db is written from the study. It used to be read back from the newest
searcher-state file in the storage; but unpickling a file because it is in a bucket runs the code
of whoever can write that bucket. Instead the searcher is given a `SweepStudyStorage`: an Optuna
InMemoryStorage that records itself, per sweep, whenever it is made or unpickled (by Tune, in
this process, when it restores the searcher). `live(sweep)` is then the storage of the searcher
this driver ran; nothing is unpickled by cxr-tune.

What this relies on from Tune (pinned by tests/test_search_study_storage.py and by the resume
tests, which check RUN/optuna.db after `--resume`): the searcher given to the Tuner is the one the
fit uses (not a copy), and a restore unpickles the searcher state in the driver's process.
This module imports Optuna at the top, unlike the rest: pickle imports it when Tune restores a
searcher, and only the sweep imports it otherwise.
"""
from __future__ import annotations

from typing import Any, ClassVar

import optuna


class SweepStudyStorage(optuna.storages.InMemoryStorage):
    """An in-memory Optuna storage that registers itself under its sweep's experiment path."""

    _live: ClassVar[dict[str, SweepStudyStorage]] = {}  # one per sweep: the newest made or restored

    def __init__(self, sweep: str) -> None:
        super().__init__()
        self.sweep = sweep
        self._register()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._register()

    def _register(self) -> None:
        SweepStudyStorage._live[self.sweep] = self

    @classmethod
    def live(cls, sweep: str) -> SweepStudyStorage | None:
        """The storage of the searcher this process made or restored last for `sweep`."""
        return cls._live.get(sweep)
