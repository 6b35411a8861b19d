"""`cxr search --address` on a real multi-node Ray cluster (tests/ray_cluster.py: a head with no
CPUs and two 1-CPU worker nodes on this machine), with the driver in a subprocess: trials run on
both workers; and a driver killed with SIGKILL mid-sweep is resumed with --resume, reaching the
requested trial count without rerunning the trials that had finished.
"""
from __future__ import annotations

import glob
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from ray_cluster import cluster_env

TEST_SPACE = ("head_layers: 1\nhead_units: {low: 8, high: 32, log: true}\nbatch_size: 32\n"
              "trainable_blocks: {choices: [0, 1]}\nlr: {low: 1.0e-3, high: 1.0e-2, log: true}\n")


@pytest.fixture(scope="module")
def cluster(ray_cluster) -> str:
    return ray_cluster.address


def _driver(args: list[str], log: Path, repo_root: Path) -> subprocess.Popen:
    env = cluster_env(RAY_DEDUP_LOGS="0")
    return subprocess.Popen([sys.executable, "-m", "cxr_search.main", "search", *args], cwd=repo_root,
                            stdout=log.open("a"), stderr=subprocess.STDOUT, env=env)


def _search_args(prepared, run: Path, space: Path, address: str, **flags) -> list[str]:
    args = [str(prepared), "--out", str(run), "--address", address, "--weights", "none", "--space", str(space),
            "--grace-period", "1", "--reduction-factor", "2", "--cpus-per-trial", "1", "--quiet"]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


@pytest.fixture
def space_file(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(TEST_SPACE)
    return path


# ----------------------------------------------------------------------------- the tests


@pytest.mark.slow  # make test-slow: test_cluster_jobs runs the documented sweep on the same kind of cluster
def test_trials_run_on_both_nodes_with_shared_storage(cluster, prepared_small, space_file, tmp_path, repo_root):
    run = tmp_path / "run"
    log = tmp_path / "driver.log"
    # 2 trials at once, 1 CPU each, 1 CPU per node: one trial per node
    driver = _driver(_search_args(prepared_small, run, space_file, cluster, trials=2, max_epochs=1, concurrency=2),
                     log, repo_root)
    assert driver.wait(timeout=240) == 0, log.read_text()[-3000:]
    table = pd.read_csv(run / "results.csv")
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    assert table["node_id"].nunique() == 2  # both raylets share an IP here; node ids differ
    # both trials' checkpoints are in the one storage folder the driver reads
    assert all(Path(p).is_dir() and str(run / "tune") in p for p in table["checkpoint"])
    assert (run / "best" / "model.keras").is_file() and (run / "report.md").is_file()


def _terminated_trials(run: Path) -> dict[str, str]:
    """{trial_id: status} from Tune's latest experiment-state snapshot in storage."""
    files = sorted(glob.glob(str(run / "tune" / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        data = json.loads(Path(files[-1]).read_text())
    except (OSError, json.JSONDecodeError):  # caught mid-write
        return {}
    trials = [json.loads(entry[0]) for entry in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials if t["status"] == "TERMINATED"}


@pytest.mark.slow  # make test-slow: resume after a kill is test_search_resume's mid-trial test in make test
def test_resume_after_the_driver_is_killed(cluster, prepared_small, space_file, tmp_path, repo_root):
    import optuna

    run = tmp_path / "run"
    log = tmp_path / "driver.log"
    trials = 3
    args = _search_args(prepared_small, run, space_file, cluster, trials=trials, max_epochs=2, concurrency=1)
    driver = _driver(args, log, repo_root)
    deadline = time.monotonic() + 200
    while not _terminated_trials(run):  # wait until one trial has finished and that is saved
        assert driver.poll() is None, "the sweep ended before it could be killed:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    driver.send_signal(signal.SIGKILL)  # no cleanup, no final state save
    driver.wait()
    finished = _terminated_trials(run)
    progress = {tid: (run / "tune" / f"trial_{tid}" / "progress.csv").read_text() for tid in finished}
    assert not (run / "report.md").exists()

    resumed = _driver(args + ["--resume"], log, repo_root)
    assert resumed.wait(timeout=240) == 0, log.read_text()[-3000:]
    table = pd.read_csv(run / "results.csv")
    assert len(table) == trials and (table["status"] == "TERMINATED").all()  # reached, not exceeded
    for tid, before in progress.items():  # finished trials were not run again
        assert (run / "tune" / f"trial_{tid}" / "progress.csv").read_text() == before
    assert (run / "report.md").is_file() and (run / "best" / "model.keras").is_file()
    study = optuna.load_study(study_name=f"cxr-{run.name}", storage=f"sqlite:///{run / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == trials
    assert optuna.trial.TrialState.RUNNING not in states  # orphans of the killed driver are closed


@pytest.mark.slow  # make test-slow: test_cluster_jobs's prepare job (with --num-cpus) and the sweep after it
def test_prepare_joins_the_cluster_named_by_ray_address_and_leaves_it_running(cluster, synth_source,
                                                                            tmp_path, repo_root):
    """As under `ray job submit`: RAY_ADDRESS names the cluster; --num-cpus (for a local Ray) is
    ignored there instead of failing; `prepare` disconnects without stopping the cluster."""
    out = tmp_path / "prepared"
    env = cluster_env(RAY_ADDRESS=cluster)
    done = subprocess.run([sys.executable, "-m", "cxr_search.main", "prepare", str(synth_source), str(out),
                           "--image-size", "32", "--num-cpus", "1", "--quiet"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(sum(c.values()) for c in manifest["counts"].values()) > 100
    probe = ("import ray, sys; ray.init(address=sys.argv[1]); "
             "print(int(ray.cluster_resources().get('CPU', 0)))")
    alive = subprocess.run([sys.executable, "-c", probe, cluster], capture_output=True, text=True,
                           timeout=120, env=cluster_env())
    assert alive.returncode == 0 and alive.stdout.split()[-1:] == ["2"], alive.stderr[-2000:]
