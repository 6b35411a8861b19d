"""A sweep survives: reused workers never fail the next trial, and a driver killed with `kill -9`
on its process group (before the first report, mid-trial, between trials, during the final
evaluation) is continued by `cxr search --resume` to N/N trials, none errored, none run twice.

The killed drivers are real `cxr search` processes, each in its own session with its own Ray
(RAY_TMPDIR in a private folder), so the kill takes down exactly what that driver started; any Ray
process of that folder still alive afterwards is ended by its process id.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from test_search_sweep import TEST_SPACE, small_config

KILL_TRIALS = 4
KILL_EPOCHS = 3


# ----------------------------------------------------------------------------- actor reuse


def _reuse_sweep(prepared, tmp_path, trials: int):
    from cxr_search.run import run_search

    # 64 px, two trials at once on two cores, ASHA stopping some after one epoch: every worker
    # process takes several trials, and the previous one is often stopped mid-way (by ASHA),
    # which is when Ray's reset used to time out.
    cfg = small_config(prepared, tmp_path / "run", tmp_path, trials=trials, max_epochs=4, grace_period=1,
                       reduction_factor=2, concurrency=2, patience=4)
    return cfg, run_search(cfg)


@pytest.fixture(scope="module")
def prepared_64(synth_source, ray_session, tmp_path_factory) -> Path:
    import cxr_datasets

    out = tmp_path_factory.mktemp("prepared64") / "prepared"
    cxr_datasets.prepare(synth_source, out, image_size=64, seed=0)
    return out


def _assert_reuse_sweep_clean(cfg, summary, trials: int):
    table = summary["table"]
    assert summary["finished"] and len(table) == trials
    errors = table[table["status"] == "ERROR"]
    assert errors.empty, errors[["trial_id", "error"]].to_string()
    assert (table["status"] == "TERMINATED").all()
    # actor reuse is kept: fewer worker processes than trials
    pids = set()
    for trial_dir in glob.glob(f"{cfg.experiment_path}/trial_*"):
        rows = _result_rows(Path(trial_dir))
        pids.update(r["pid"] for r in rows)
    assert 0 < len(pids) < trials
    assert (table["stopped_by"] == "asha").any() and (table["stopped_by"] == "max_epochs").any()


@pytest.mark.slow  # make test-slow: reuse of trial processes is internal, not a documented path
@pytest.mark.timeout(600)
def test_reused_workers_take_trial_after_trial_without_error(ray_session, prepared_64, tmp_path):
    cfg, summary = _reuse_sweep(prepared_64, tmp_path, trials=12)
    _assert_reuse_sweep_clean(cfg, summary, 12)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("repetition", range(3))
def test_reused_workers_16_trials_repeated(ray_session, prepared_64, tmp_path, repetition):
    cfg, summary = _reuse_sweep(prepared_64, tmp_path, trials=16)
    _assert_reuse_sweep_clean(cfg, summary, 16)


# ----------------------------------------------------------------------------- killed driver


def _result_rows(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _experiment_trials(experiment: Path) -> list[dict]:
    """[{id, status, epoch}] as Tune last saved them (what a resume starts from)."""
    files = sorted(experiment.glob("experiment_state-*.json"))
    if not files:
        return []
    try:
        state = json.loads(files[-1].read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return []
    trials = []
    for trial_json, meta_json in state["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        last = meta.get("last_result") or {}
        trials.append({"id": trial["trial_id"], "status": trial["status"], "epoch": last.get("epoch", 0)})
    return trials


def _started(log: str) -> list[str]:
    return re.findall(r"Trial train_trial_(\w+) started with configuration", log)


def _completed(log: str) -> list[str]:
    return re.findall(r"Trial train_trial_(\w+) completed after", log)


def _has_checkpoint(run: Path, trial_id: str) -> bool:
    # A trial's first report always checkpoints (its first val AUC is its best so far), and the
    # trial writes its checkpoints straight to storage: none yet means no report yet.
    return any((run / "tune" / f"trial_{trial_id}").glob("checkpoint_*"))


def _before_first_report(run: Path, log: str) -> bool:
    started = _started(log)
    return bool(started) and not any(_has_checkpoint(run, t) for t in started)


def _mid_trial(run: Path, log: str) -> bool:
    return any(t["status"] == "RUNNING" and 1 <= t["epoch"] < KILL_EPOCHS for t in _experiment_trials(run / "tune"))


def _between_trials(run: Path, log: str) -> bool:
    """A trial has ended and the next one has not reported yet (concurrency 1)."""
    started, completed = _started(log), _completed(log)
    return bool(completed) and (len(started) == len(completed) or not _has_checkpoint(run, started[-1]))


def _final_evaluation(run: Path, log: str) -> bool:
    return (run / "results.csv").is_file()


KILL_POINTS = {"before_first_report": _before_first_report, "mid_trial": _mid_trial,
               "between_trials": _between_trials, "final_evaluation": _final_evaluation}


class Driver:
    """`cxr search` in its own session and with its own Ray temp folder."""

    def __init__(self, args: list[str], tmp: Path, ray_tmp: str, name: str):
        env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        self.log = tmp / f"{name}.log"
        self.ray_tmp = ray_tmp
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "cxr_search.main", "search", *args], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=Path(__file__).resolve().parents[1], env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        end_ray_processes(self.ray_tmp)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill_group()
            end_ray_processes(self.ray_tmp)


def end_ray_processes(ray_tmp: str) -> None:
    """SIGKILL, by pid, every process whose command line names this private Ray folder."""
    me = os.getpid()
    for _ in range(20):
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if ray_tmp in cmdline:
                pids.append(int(entry))
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _search_args(prepared: Path, run: Path, space: Path) -> list[str]:
    return [str(prepared), "--out", str(run), "--trials", str(KILL_TRIALS), "--max-epochs", str(KILL_EPOCHS),
            "--grace-period", "1", "--reduction-factor", "2", "--concurrency", "1", "--weights", "none",
            "--max-failures", "2", "--patience", str(KILL_EPOCHS), "--space", str(space), "--formats", "keras"]


def kill_and_resume(prepared: Path, tmp_path: Path, point: str, storage: bool = False) -> dict:
    """Start a sweep, SIGKILL its process group at `point`, resume; returns what the checks need.

    storage: the sweep reads PREPARED as a file:// URI and runs with `--storage file://...`; after
    the kill its run folder is deleted and a second driver in a fresh folder, given only `--resume
    --storage URI`, continues it.
    """
    space = tmp_path / "space.yaml"
    space.write_text(TEST_SPACE + "trainable_blocks: 0\n")
    run = tmp_path / "head1" / "sweep" if storage else tmp_path / "run"
    store = tmp_path / "store" if storage else run  # where Tune's state and the results live
    extra = ["--storage", store.as_uri()] if storage else []
    if storage:  # as s3://bucket/prepared/ would be given; the sweep records it without the slash
        prepared = prepared.as_uri() + "/"  # type: ignore[assignment]
    ray_tmp = tempfile.mkdtemp(prefix="cxr12-", dir="/tmp")  # short: Ray's socket paths have a limit
    first = None
    try:
        first = Driver(_search_args(prepared, run, space) + extra, tmp_path, ray_tmp, "first")
        deadline = time.monotonic() + 240
        while not KILL_POINTS[point](store, first.output()):
            if first.proc.poll() is not None or time.monotonic() > deadline:
                first.kill_group()
                pytest.fail(f"kill point {point} never reached (rc {first.proc.returncode}):\n"
                            + first.output()[-3000:])
            time.sleep(0.05)
        before = _experiment_trials(store / "tune")
        kill_time = time.time()
        first.kill_group()
        if storage:  # everything of the first head is gone; only the storage remains
            shutil.rmtree(tmp_path / "head1")
            run = tmp_path / "head2" / "other-name"
        second = Driver([str(prepared), "--out", str(run), "--resume", *extra], tmp_path, ray_tmp, "resume")
        rc = second.wait(timeout=400)
        return {"run": run, "store": store, "rc": rc, "output": second.output(), "before": before,
                "kill_time": kill_time}
    finally:
        if first is not None and first.proc.poll() is None:
            first.kill_group()
        end_ray_processes(ray_tmp)


def assert_resumed_cleanly(result: dict) -> None:
    import optuna

    run, store, output = result["run"], result["store"], result["output"]
    assert result["rc"] == 0, output[-4000:]
    for noise in ("FileNotFoundError", "Could not fetch metrics", "reset_config"):
        assert noise not in output, output[-4000:]
    table = pd.read_csv(run / "results.csv")
    assert len(table) == KILL_TRIALS and table["trial_id"].is_unique, table.to_string()
    assert (table["status"] == "TERMINATED").all(), table[["trial_id", "status", "error"]].to_string()
    assert sorted(p.name for p in (store / "tune").glob("trial_*")) == sorted(f"trial_{t}" for t in table["trial_id"])
    # none run twice: a trial that had ended before the kill reported nothing after it, and a
    # retried one went on from its checkpoint (no epoch at or before it reported again)
    ended = {t["id"] for t in result["before"] if t["status"] in ("TERMINATED", "ERROR")}
    for trial_id in table["trial_id"]:
        rows = _result_rows(store / "tune" / f"trial_{trial_id}")
        assert rows, trial_id
        if trial_id in ended:
            assert max(r["timestamp"] for r in rows) <= result["kill_time"] + 1, trial_id
        for row in rows:
            assert row["epoch"] > row["resumed_from_epoch"], (trial_id, row["epoch"], row["resumed_from_epoch"])
    saved = json.loads((run / "search_config.json").read_text())
    study = optuna.load_study(study_name=saved["study"], storage=saved.get("optuna_storage")
                              or f"sqlite:///{run / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == KILL_TRIALS, states
    assert optuna.trial.TrialState.RUNNING not in states
    card = json.loads((run / "best" / "model_card.json").read_text()) if (run / "best" / "model_card.json").is_file() \
        else None
    assert (run / "report.md").is_file() and (card is None or "threshold" in card)


@pytest.mark.timeout(600)
def test_driver_killed_mid_trial_resumes_from_the_storage_alone_to_every_trial(prepared_small, tmp_path):
    """The run's whole state lives in --storage: the sweep's driver killed mid-trial and its run
    folder deleted, a second driver in a fresh folder given only `--resume --storage URI` finishes
    it. PREPARED and the storage are file:// URIs here, through the same pyarrow filesystem layer
    as s3:// and gs:// (there is no network)."""
    import dataclasses

    import optuna

    import cxr_datasets
    from cxr_datasets import CxrError
    from cxr_search.config import SearchConfig
    from cxr_search.run import run_search

    result = kill_and_resume(prepared_small, tmp_path, "mid_trial", storage=True)
    assert_resumed_cleanly(result)
    run, store = result["run"], result["store"]
    saved = json.loads((store / "search_config.json").read_text())
    assert saved["study"] == "cxr-sweep" and saved["storage"] == store.as_uri()
    # PREPARED: the URI as given (not made into a local path), and its manifest's hash
    cfg = SearchConfig.load(run)
    assert cfg.prepared == prepared_small.as_uri()
    assert cfg.prepared_hash == cxr_datasets.manifest_hash(prepared_small)
    card = json.loads((run / "best" / "model_card.json").read_text())
    assert card["data"]["manifest_hash"] == cfg.prepared_hash
    report = (run / "report.md").read_text()
    assert f"Prepared data: `{cfg.prepared}` (manifest sha256 `{cfg.prepared_hash[:12]}...`)" in report
    assert json.loads((run / "search_config.json").read_text())["out"] == str(run)
    for results in (run / "results.csv", store / "results.csv"):
        table = pd.read_csv(results)
        assert len(table) == KILL_TRIALS and (table["status"] == "TERMINATED").all(), table.to_string()
    # the same study went on (TPE kept its trials), N trials in all, in both copies
    for db in (run / "optuna.db", store / "optuna.db"):
        study = optuna.load_study(study_name="cxr-sweep", storage=f"sqlite:///{db}")
        states = [t.state for t in study.get_trials()]
        assert states.count(optuna.trial.TrialState.COMPLETE) == KILL_TRIALS and len(states) == KILL_TRIALS, states
    assert (run / "report.md").is_file() and (run / "best").is_dir()

    # Resuming on data that is no longer the sweep's (re-prepared, or another copy) is refused
    # before anything runs.
    other = tmp_path / "other"
    shutil.copytree(prepared_small, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["options"]["seed"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CxrError, match=f"^{other.as_uri()} is not the prepared data this sweep started with"):
        run_search(dataclasses.replace(cfg, prepared=other.as_uri()), resume=True)
    assert SearchConfig.load(run) == cfg  # nothing changed


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("repetition", range(3))
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_driver_killed_at_each_point_resumes_to_every_trial(prepared_small, tmp_path, point, repetition):
    assert_resumed_cleanly(kill_and_resume(prepared_small, tmp_path, point))


# ----------------------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("space", ["trainable_blocks: 0\naugment: false\n",
                                   # make test-slow: the same retry path with the base fine-tuned
                                   pytest.param("trainable_blocks: 1\naugment: false\n", marks=pytest.mark.slow)],
                         ids=["cached_features", "end_to_end"])
def test_killed_trial_worker_is_retried_from_its_checkpoint_with_optimizer_state(ray_session, prepared_small,
                                                                                 tmp_path, space):
    """A worker SIGKILLed after epoch 2 is retried, in a new process, from its checkpoint with the
    optimizer's state, not only the weights: Adam's step count goes on from the checkpoint instead
    of restarting."""
    from test_search_sweep import KillWorkerOnce

    from cxr_search.results import collect_results
    from cxr_search.tuner import run_sweep

    cfg = small_config(prepared_small, tmp_path / "run", tmp_path, space, trials=1, max_epochs=3, max_failures=1)
    cfg.save()
    killer = KillWorkerOnce(at_epoch=2)
    grid = run_sweep(cfg, callbacks=[killer])
    assert killer.killed_pid is not None
    assert grid.num_errors == 0 and grid.num_terminated == 1
    table, histories = collect_results(cfg)
    row = table.iloc[0]
    rows = _result_rows(Path(cfg.experiment_path) / f"trial_{row['trial_id']}")
    assert row["attempts"] == 2 and row["status"] == "TERMINATED"
    assert row["epochs_run"] == 3 and row["stopped_by"] == "max_epochs"
    epochs = histories[row["trial_id"]]
    # the retry started after the epoch-1 checkpoint (or the epoch-2 one, if it was written in
    # time), in a new process, and did not start again from epoch 1
    assert epochs["resumed_from_epoch"][epochs["resumed_from_epoch"] > 0].iloc[0] in (1, 2)
    assert epochs["epoch"].tolist() == [1, 2, 3]
    assert row["val_auc"] == pytest.approx(max(row[f"val_auc_e{e}"] for e in (1, 2, 3)))
    resumed = [r for r in rows if r["resumed_from_epoch"] > 0]
    assert resumed and all(r["pid"] != killer.killed_pid for r in resumed)
    steps = rows[0]["optimizer_steps"]
    assert rows[0]["epoch"] == 1 and steps > 0
    # every report, before and after the retry: the optimizer has taken one epoch of steps per epoch
    assert [r["optimizer_steps"] for r in rows] == [r["epoch"] * steps for r in rows]
    # once the trial ended, its checkpoint keeps the weights; the optimizer's state, which only a
    # retry of the running trial needed, is deleted (search/tuner.py, DropOptimizerState)
    checkpoint = Path(row["checkpoint"])
    assert (checkpoint / "weights.npz").is_file() and not (checkpoint / "optimizer.npz").exists()
