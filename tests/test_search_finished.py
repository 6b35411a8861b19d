"""When a sweep counts as finished (search/tuner.py, sweep_finished): every requested trial
errored or reported its metric; a trial Ctrl-C stopped before its first report did neither."""
from __future__ import annotations

from types import SimpleNamespace

from cxr_search.config import SearchConfig
from cxr_search.space import METRIC
from cxr_search.tuner import sweep_finished


def _result(metrics=None, error=None):
    return SimpleNamespace(metrics=metrics, error=error)


def test_a_trial_stopped_before_its_first_report_leaves_the_sweep_unfinished(tmp_path):
    cfg = SearchConfig(prepared="p", out=str(tmp_path / "run"), trials=3)
    reported, failed = _result({METRIC: 0.8, "epoch": 1}), _result({}, error=RuntimeError("x"))
    assert sweep_finished(cfg, [reported, failed, _result({METRIC: 0.7})])
    assert not sweep_finished(cfg, [reported, failed, _result({})])  # Ctrl-C during its first epoch
    assert not sweep_finished(cfg, [reported, failed, _result(None)])
    assert not sweep_finished(cfg, [reported, failed])  # the third never started
