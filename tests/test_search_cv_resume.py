"""`cxr search --cv` survives crashes: a trial whose worker is SIGKILLed after fold 1 is retried
from its checkpoint and goes on with fold 2, and a driver killed with `kill -9` mid-trial is
continued by `--resume` to N/N trials, none errored, no fold trained twice."""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from ray import tune
from test_search_resume import Driver, _result_rows, end_ray_processes
from test_search_sweep import TEST_SPACE, small_config

K = 3
TRIALS = 3


class KillWorkerAfterFold(tune.Callback):
    """SIGKILL the trial's worker right after it reports fold `fold` (its checkpoint is written)."""

    def __init__(self, fold: int):
        self.fold = fold
        self.killed_pid = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed_pid is None and result.get("folds_done") == self.fold:
            self.killed_pid = result["pid"]
            os.kill(self.killed_pid, signal.SIGKILL)


@pytest.mark.slow  # make test-slow: make test retries a killed single-split trial; this is its --cv variant
@pytest.mark.timeout(600)
def test_a_killed_cv_trial_is_retried_from_its_last_fold(ray_session, prepared_small, tmp_path):
    from cxr_search.results import collect_results
    from cxr_search.tuner import run_sweep

    cfg = small_config(prepared_small, tmp_path / "run", tmp_path, "trainable_blocks: 0\naugment: false\n",
                       trials=1, max_epochs=2, max_failures=1, cv=K)
    cfg.save()
    killer = KillWorkerAfterFold(fold=2)
    grid = run_sweep(cfg, callbacks=[killer])
    assert killer.killed_pid is not None
    assert grid.num_errors == 0 and grid.num_terminated == 1
    table, _ = collect_results(cfg)
    row = table.iloc[0]
    assert row["attempts"] == 2 and row["folds_done"] == K and row["stopped_by"] == "folds"
    rows = _result_rows(Path(cfg.experiment_path) / f"trial_{row['trial_id']}")
    # the retry went on after fold 1's checkpoint (or fold 2's, if Tune had registered it before
    # the kill): the folds before it were not trained again
    resumed = [r for r in rows if r["resumed_from_fold"] > 0]
    assert resumed and all(r["pid"] != killer.killed_pid for r in resumed)
    assert resumed[0]["resumed_from_fold"] in (1, 2)
    folds = [r for r in rows if r["folds_done"] > 0]
    assert all(r["folds_done"] > r["resumed_from_fold"] for r in folds)
    assert sorted({r["folds_done"] for r in folds}) == [1, 2, 3]
    state = json.loads((Path(row["checkpoint"]) / "state.json").read_text())
    assert [f["fold"] for f in state["folds"]] == [1, 2, 3]
    assert all((Path(row["checkpoint"]) / f"fold_{f}" / "weights.npz").is_file() for f in (1, 2, 3))


def _cv_trials(experiment: Path) -> list[dict]:
    files = sorted(experiment.glob("experiment_state-*.json"))
    if not files:
        return []
    try:
        state = json.loads(files[-1].read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return []
    out = []
    for trial_json, meta_json in state["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        last = meta.get("last_result") or {}
        out.append({"id": trial["trial_id"], "status": trial["status"], "folds": last.get("folds_done", 0)})
    return out


@pytest.mark.slow  # make test-slow: make test kills and resumes a single-split sweep; this is its --cv variant
@pytest.mark.timeout(900)
def test_driver_killed_mid_cv_trial_resumes_to_every_trial(prepared_small, tmp_path):
    import optuna

    space = tmp_path / "space.yaml"
    space.write_text(TEST_SPACE + "trainable_blocks: 0\n")
    run = tmp_path / "run"
    args = [str(prepared_small), "--out", str(run), "--trials", str(TRIALS), "--max-epochs", "2", "--cv", str(K),
            "--reduction-factor", "2", "--concurrency", "1", "--weights", "none", "--max-failures", "2",
            "--patience", "2", "--space", str(space)]
    ray_tmp = tempfile.mkdtemp(prefix="cxr19-", dir="/tmp")
    first = None
    try:
        first = Driver(args, tmp_path, ray_tmp, "first")
        deadline = time.monotonic() + 300
        # mid-trial: a trial has reported fold 1 (or 2) and not its last fold
        while not any(t["status"] == "RUNNING" and 1 <= t["folds"] < K for t in _cv_trials(run / "tune")):
            if first.proc.poll() is not None or time.monotonic() > deadline:
                first.kill_group()
                pytest.fail(f"no trial was caught between folds (rc {first.proc.returncode}):\n"
                            + first.output()[-3000:])
            time.sleep(0.05)
        before = _cv_trials(run / "tune")
        kill_time = time.time()
        first.kill_group()
        second = Driver([str(prepared_small), "--out", str(run), "--resume"], tmp_path, ray_tmp, "resume")
        rc = second.wait(timeout=500)
        output = second.output()
    finally:
        if first is not None and first.proc.poll() is None:
            first.kill_group()
        end_ray_processes(ray_tmp)
    assert rc == 0, output[-4000:]
    table = pd.read_csv(run / "results.csv")
    assert len(table) == TRIALS and table["trial_id"].is_unique
    assert (table["status"] == "TERMINATED").all(), table[["trial_id", "status", "error"]].to_string()
    complete = table[table["folds_done"] == K]
    assert len(complete) >= 1 and (table.loc[table["folds_done"] < K, "stopped_by"] == "asha").all()
    ended = {t["id"] for t in before if t["status"] in ("TERMINATED", "ERROR")}
    for trial_id in table["trial_id"]:
        reports = _result_rows(run / "tune" / f"trial_{trial_id}")
        assert reports, trial_id
        rows = [r for r in reports if r["folds_done"] > 0]
        # every fold it ran reported; none before the checkpoint a retry started from
        if trial_id in set(complete["trial_id"]):
            assert sorted({r["folds_done"] for r in rows}) == list(range(1, K + 1)), trial_id
        assert all(r["folds_done"] > r["resumed_from_fold"] for r in rows), trial_id
        if trial_id in ended:
            assert max(r["timestamp"] for r in reports) <= kill_time + 1, trial_id
    study = optuna.load_study(study_name=f"cxr-{run.name}", storage=f"sqlite:///{run / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == TRIALS, states
    card = json.loads((run / "best" / "model_card.json").read_text())
    assert card["threshold_selection"]["split"] == "oof" and card["extra"]["cv"]["members"] == K
    assert (run / "folds.csv").is_file() and "## Cross-validation" in (run / "report.md").read_text()
