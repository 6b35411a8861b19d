"""The run's whole state lives in --storage: a sweep started in one folder, its driver killed, is
continued by a second driver in a fresh folder given only `--resume --storage URI` (here a local
file:// storage, through the same pyarrow filesystem layer as s3:// and gs://)."""
from __future__ import annotations

import json
import shutil
import tempfile
import time

import optuna
import pandas as pd
import pytest
from test_search_resume import (
    KILL_EPOCHS,
    KILL_TRIALS,
    Driver,
    _mid_trial,
    _result_rows,
    _search_args,
    end_ray_processes,
)
from test_search_sweep import TEST_SPACE


@pytest.mark.timeout(600)
def test_second_driver_in_a_fresh_folder_resumes_from_the_storage_alone(prepared_small, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(TEST_SPACE + "trainable_blocks: 0\n")
    store = tmp_path / "store"
    uri = f"file://{store}"
    head1, head2 = tmp_path / "head1" / "sweep", tmp_path / "head2" / "other-name"
    ray_tmp = tempfile.mkdtemp(prefix="cxr12s-", dir="/tmp")
    first = second = None
    try:
        first = Driver(_search_args(prepared_small, head1, space) + ["--storage", uri], tmp_path, ray_tmp, "first")
        deadline = time.monotonic() + 240
        while not _mid_trial(store, ""):
            assert first.proc.poll() is None and time.monotonic() < deadline, first.output()[-3000:]
            time.sleep(0.05)
        first.kill_group()
        # everything of the first head is gone; only the storage remains
        shutil.rmtree(tmp_path / "head1")
        for name in ("search_config.json", "tune"):
            assert (store / name).exists(), name
        second = Driver([str(prepared_small), "--out", str(head2), "--resume", "--storage", uri], tmp_path,
                        ray_tmp, "second")
        rc = second.wait(timeout=400)
    finally:
        for driver in (first, second):
            if driver is not None and driver.proc.poll() is None:
                driver.kill_group()
        end_ray_processes(ray_tmp)
    output = second.output()
    assert rc == 0, output[-4000:]
    assert "FileNotFoundError" not in output and "reset_config" not in output
    saved = json.loads((store / "search_config.json").read_text())
    assert saved["study"] == "cxr-sweep" and saved["storage"] == uri
    for results in (head2 / "results.csv", store / "results.csv"):
        table = pd.read_csv(results)
        assert len(table) == KILL_TRIALS and (table["status"] == "TERMINATED").all(), table.to_string()
    assert len(list((store / "tune").glob("trial_*"))) == KILL_TRIALS
    for trial_dir in (store / "tune").glob("trial_*"):
        assert all(r["epoch"] > r["resumed_from_epoch"] for r in _result_rows(trial_dir))
    # the same study went on (TPE kept its trials), N trials in all, in both copies
    for db in (head2 / "optuna.db", store / "optuna.db"):
        study = optuna.load_study(study_name="cxr-sweep", storage=f"sqlite:///{db}")
        states = [t.state for t in study.get_trials()]
        assert states.count(optuna.trial.TrialState.COMPLETE) == KILL_TRIALS and len(states) == KILL_TRIALS, states
    assert (head2 / "report.md").is_file() and (head2 / "best").is_dir()
    assert json.loads((head2 / "search_config.json").read_text())["out"] == str(head2)
    assert KILL_EPOCHS >= 2
