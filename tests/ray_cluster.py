"""A real multi-node Ray cluster on this machine for the tests: `ray start --head --num-cpus 0`
with the dashboard (the job server of `ray job submit`) and worker nodes joined with `ray start
--address`, as README.md "Run on a cluster" describes. One cluster per test session (the
`ray_cluster` fixture in conftest.py), shared by test_cluster_two_node.py and test_cluster_jobs.py.

Every node is `ray start --block` under a private temp dir with its own free ports (other Ray
instances on this shared machine must not meet it), and is torn down by the ids of the processes
started here, never with `ray stop` (which would stop every Ray on the machine).
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Cluster:
    address: str         # the GCS, HOST:PORT: `ray start --address`, `cxr ... --address`
    dashboard: str       # http://HOST:PORT: `ray job submit --address`
    temp_dir: str        # the head's session folder lives here (shared by all nodes on one host)
    worker_cpus: int     # CPUs of all worker nodes together; the head has none
    worker_pids: tuple[int, ...] = ()  # each worker node's `ray start --block` (its processes are its descendants)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    # Ports that default to fixed numbers: several raylets here, and other Ray instances on this
    # shared machine, must not collide on them.
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port")
    return [arg for flag in flags for arg in (flag, str(free_port()))]


def cluster_env(**extra: str) -> dict[str, str]:
    """The environment of every process of, or talking to, the test cluster: the venv's `ray` and
    `cxr` first on PATH (as after `source .venv/bin/activate`: the job server starts the
    entrypoint by name); token auth off for all of them explicitly: left to Ray, a head finds
    ~/.ray/auth_token and turns it on while a joining node may not."""
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, PATH=path, RAY_AUTH_MODE="disabled", **extra)


def _ray_start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *_node_ports(),
                             "--object-store-memory", str(300 * 2**20), *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=cluster_env())


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"no {text!r} in {log} after {timeout} s")


def pids_using(marker: str) -> list[int]:
    """Processes of this cluster: their command lines name its private temp dir."""
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if marker in Path(cmdline).read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.split("/")[2]))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def _stop(nodes: list[subprocess.Popen], temp_dir: str) -> None:
    # `ray start --block` stops its node on SIGTERM: the workers together first, then the head.
    for group in (nodes[:-1], nodes[-1:]):
        for proc in group:
            if proc.poll() is None:
                proc.terminate()
        for proc in group:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # its own process group (start_new_session)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for pid in pids_using(temp_dir):  # anything that outlived its raylet
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def ray_cluster(workers: int = 2, cpus_per_worker: int = 1) -> Iterator[Cluster]:
    """A head that takes no work (`--num-cpus 0`, with the dashboard) and `workers` worker nodes."""
    # Short private temp dir: Ray's socket paths live under it and must stay under 108 characters.
    temp_dir = tempfile.mkdtemp(prefix="cxrc-", dir="/tmp")
    port, dashboard_port = free_port(), free_port()
    nodes: list[subprocess.Popen] = []
    try:
        head_log = Path(temp_dir) / "head.log"
        nodes.append(_ray_start(["--head", "--num-cpus", "0", "--port", str(port), "--temp-dir", temp_dir,
                                 "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                                 "--dashboard-port", str(dashboard_port),
                                 "--ray-client-server-port", str(free_port())], head_log))
        _wait_for_line(nodes[0], head_log, "Ray runtime started")
        for i in range(workers):
            log = Path(temp_dir) / f"worker{i}.log"
            args = ["--address", f"127.0.0.1:{port}", "--num-cpus", str(cpus_per_worker)]
            for attempt in range(3):
                nodes.insert(0, _ray_start(args, log))
                try:
                    _wait_for_line(nodes[0], log, "Ray runtime started")
                    break
                except RuntimeError:
                    # `ray start` gives a raylet 30 s to register (a constant in ray/_private/node.py);
                    # on 2 busy cores under `make test`'s two workers the GCS can answer later than
                    # that. Only that failure is retried, on a fresh node; anything else is raised.
                    if attempt == 2 or "timed out during startup" not in log.read_text(errors="replace"):
                        raise
                    failed = nodes.pop(0)
                    try:
                        os.killpg(failed.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    failed.wait()
        yield Cluster(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard_port}",
                      temp_dir=temp_dir, worker_cpus=workers * cpus_per_worker,
                      worker_pids=tuple(proc.pid for proc in reversed(nodes[:-1])))
    finally:
        _stop(nodes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
