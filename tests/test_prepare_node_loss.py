"""A node lost mid-prepare: on a real multi-node Ray on this machine (tests/ray_cluster.py: a head
with no CPUs, two 1-CPU worker nodes), `cxr prepare` runs as a driver that joins the cluster, and
once its second pass is writing shards every process of one worker node is killed (SIGKILL).
Either the job finishes with every file exactly once (Ray Data retries the lost tasks on the
other node, and Ray rebuilds the lost blocks), or it fails with one line and leaves no OUT.
"""
from __future__ import annotations

import importlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_cluster import cluster_env

import cxr_datasets


def _copies(samples_dir: Path, root: Path, n: int) -> Path:
    """`n` copies of the real samples (~0.85 MP: a few ms to decode each), each with distinct
    bytes after the JPEG end marker and a name of its own patient; every 9th in test/."""
    originals = sorted(samples_dir.glob("train/*/*.jpeg"))
    for number in range(n):
        original = originals[number % len(originals)]
        label = original.parent.name
        split = "test" if number % 9 == 0 else "train"
        name = f"person{number}_bacteria_{number}.jpeg" if label == "PNEUMONIA" else \
            f"IM-{number:04d}-0001.jpeg"
        target = root / "chest_xray" / split / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(original.read_bytes() + f"copy-{number}".encode())
    return root


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL a node's `ray start --block` and every process below it (raylet, object store,
    workers): the node is gone as if its machine had died."""
    import ray  # noqa: F401  puts Ray's bundled psutil on sys.path

    psutil = importlib.import_module("psutil")

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    victims = [root, *root.children(recursive=True)]
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in victims]


def _failed_attempts(dashboard: str) -> str:
    """How many task attempts the cluster saw fail (what Ray Data then retried), for the log."""
    try:
        from ray.util.state import list_tasks

        return str(len(list_tasks(address=dashboard, filters=[("state", "=", "FAILED")],
                                  limit=10_000, raise_on_missing_output=False)))
    except Exception as exc:  # noqa: BLE001  only a diagnostic
        return f"? ({type(exc).__name__})"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_node_killed_mid_prepare(ray_cluster, samples_dir, tmp_path):
    n_files = 900
    source = _copies(samples_dir, tmp_path / "src", n_files)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cxr_search.main", "prepare", str(source), str(out),
               "--image-size", "32", "--rows-per-shard", "50", "--quiet"]
    proc = subprocess.Popen(command, env=cluster_env(RAY_ADDRESS=ray_cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        # Pass 2 is writing once a block has reached the staging folder's .pending/.
        while not list(tmp_path.glob(".out.partial-*/.pending/*")):
            assert proc.poll() is None, f"prepare ended before the kill:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "pass 2 never started"
            time.sleep(0.05)
        killed = _kill_tree(ray_cluster.worker_pids[0])
        assert killed
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    if proc.returncode == 0:
        manifest = cxr_datasets.read_manifest(out)
        assert manifest["rejected"] == [] and manifest["duplicates"] == []
        seen: list[str] = []
        for split in cxr_datasets.SPLITS:
            images, labels, meta = cxr_datasets.load(out, split)  # every shard's sha256 checked
            assert len(images) == len(labels) == len(meta)
            seen.extend(meta["source_path"])
        expected = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.jpeg"))
        assert sorted(seen) == expected  # every file exactly once
        assert not leftovers, leftovers
        print(f"finished after the kill: {len(seen)} files, {len(manifest['shards'])} shards, "
              f"{_failed_attempts(ray_cluster.dashboard)} task attempts lost with the node")
    else:
        # Ray may warn about the dead node on the way; the command's own word is one line, last.
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("cxr: error: "), stderr[-3000:]
        assert not out.exists() and not leftovers, leftovers
