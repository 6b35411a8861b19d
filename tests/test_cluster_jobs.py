"""README.md "Run on a cluster", run as written, on a real multi-node Ray on this machine
(tests/ray_cluster.py: `ray start --head --num-cpus 0` with the dashboard, two worker nodes joined
with `ray start --address`): `ray job submit -- cxr prepare ...`, then `ray job submit -- cxr search
... --address auto --storage file://...`, stopped with `ray job stop` mid-sweep and submitted again
with --resume. Every requested trial finishes, none errored, none ran twice, and every trial ran on
a worker node, never on the head.

No `--working-dir`: the project is installed on every node (the venv here; the image or the setup
commands on a real cluster), which is the variant README.md documents and explains.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from ray_cluster import VENV_BIN, cluster_env

SPACE = ("head_layers: 1\nhead_units: {low: 8, high: 32, log: true}\nbatch_size: 32\n"
         "trainable_blocks: 0\nlr: {low: 1.0e-3, high: 1.0e-2, log: true}\n")


def ray_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout,
                          env=cluster_env())


def submit(dashboard: str, entrypoint: str, *, submission_id: str, wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit --address DASHBOARD [--no-wait] --submission-id ID -- ENTRYPOINT`."""
    flags = [] if wait else ["--no-wait"]
    return ray_cli("job", "submit", "--address", dashboard, *flags, "--submission-id", submission_id, "--",
                   *shlex.split(entrypoint), timeout=600)


def job_status(dashboard: str, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(dashboard).get_job_status(submission_id).value)


def job_logs(dashboard: str, submission_id: str) -> str:
    return ray_cli("job", "logs", "--address", dashboard, submission_id).stdout[-4000:]


def wait_for_dashboard(dashboard: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{dashboard}/api/version", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def node_ids(dashboard: str) -> tuple[str, set[str]]:
    """(the head's node id, the worker nodes' ids), from the cluster's own state API."""
    from ray.util.state import list_nodes

    nodes = [n for n in list_nodes(address=dashboard, detail=True) if n.state == "ALIVE"]
    head = [n.node_id for n in nodes if n.is_head_node]
    assert len(head) == 1, nodes
    return head[0], {n.node_id for n in nodes if not n.is_head_node}


def trial_states(storage: Path) -> dict[str, str]:
    """{trial_id: status} from Tune's latest experiment-state snapshot in the storage."""
    files = sorted((storage / "tune").glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):  # caught mid-write
        return {}
    trials = [json.loads(entry[0]) for entry in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


@pytest.mark.timeout(900)
def test_readme_cluster_path_prepare_search_stop_resume(ray_cluster, synth_source, tmp_path):
    dashboard = ray_cluster.dashboard
    wait_for_dashboard(dashboard)
    head_id, worker_ids = node_ids(dashboard)
    assert len(worker_ids) == 2

    # 1. prepare, as a job (its decode tasks run on the workers: the head has no CPUs); it joins
    # the cluster RAY_ADDRESS names, ignores --num-cpus (for a local Ray) instead of failing, and
    # leaves the cluster running for the sweep
    prepared = tmp_path / "prepared"
    done = submit(dashboard, f"cxr prepare {synth_source} {prepared} --image-size 32 --num-cpus 1 --quiet",
                  submission_id="prepare")
    assert done.returncode == 0 and job_status(dashboard, "prepare") == "SUCCEEDED", \
        done.stdout[-3000:] + done.stderr[-3000:]
    assert (prepared / "manifest.json").is_file()

    # 2. the sweep, as a job; stopped with `ray job stop` once one trial has finished
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    run, storage = tmp_path / "runs" / "s1", tmp_path / "storage" / "s1"
    trials = 4
    search = (f"cxr search {prepared} --out {run} --address auto --storage file://{storage} "
              f"--trials {trials} --max-epochs 2 --grace-period 1 --reduction-factor 2 --concurrency 2 "
              f"--cpus-per-trial 1 --weights none --space {space} --quiet --formats keras")
    done = submit(dashboard, search, submission_id="s1", wait=False)
    assert done.returncode == 0, done.stderr[-3000:]
    deadline = time.monotonic() + 300
    while "TERMINATED" not in trial_states(storage).values():
        status = job_status(dashboard, "s1")
        assert status == "RUNNING" or status == "PENDING", f"{status} before it could be stopped:\n" + \
            job_logs(dashboard, "s1")
        assert time.monotonic() < deadline, job_logs(dashboard, "s1")
        time.sleep(0.5)
    stopped = ray_cli("job", "stop", "--address", dashboard, "s1")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert job_status(dashboard, "s1") == "STOPPED"
    finished = {tid for tid, status in trial_states(storage).items() if status == "TERMINATED"}
    assert 0 < len(finished) < trials
    progress = {tid: (storage / "tune" / f"trial_{tid}" / "progress.csv").read_text() for tid in finished}
    assert not (run / "report.md").exists()

    # 3. the same command with --resume, as a new job: the sweep ends with every trial finished
    done = submit(dashboard, search + " --resume", submission_id="s1-resume")
    logs = job_logs(dashboard, "s1-resume")
    assert done.returncode == 0 and job_status(dashboard, "s1-resume") == "SUCCEEDED", logs
    table = pd.read_csv(run / "results.csv")
    assert len(table) == trials, table
    assert (table["status"] == "TERMINATED").all(), table[["trial_id", "status"]]  # none errored
    assert set(trial_states(storage).values()) == {"TERMINATED"}
    for tid, before in progress.items():  # the trials finished before the stop were not run again
        assert (storage / "tune" / f"trial_{tid}" / "progress.csv").read_text() == before
    # every trial ran on a worker node, none on the head
    assert set(table["node_id"]) <= worker_ids and head_id not in set(table["node_id"]), (head_id, table["node_id"])
    assert (run / "report.md").is_file() and (run / "best" / "model.keras").is_file()
