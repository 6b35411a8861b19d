"""Dependencies that fit a cluster: `ray[default]` (the job server and CLI of `ray job submit`),
and constraints.txt, the exact versions every node installs (Dockerfile, cluster.yaml, the Slurm
venv, `make install`): complete for `cxr-tune[gpu,aws]` and consistent with pyproject.toml.

The lock's closure is walked through the metadata of the installed distributions (offline); the
GPU-only ones (JAX's CUDA plugin, NVIDIA's libraries) are not installed here and are checked by
name and pin only. `make lock` re-resolves it after a change to pyproject.toml.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CLUSTER_EXTRAS = ("gpu", "aws")  # what cluster nodes install (cluster.yaml, Dockerfile)
# Linux x86_64, Python 3.11: Ray's cluster image, for which the lock is resolved.
NODE_ENV = default_environment() | {"python_version": "3.11", "python_full_version": "3.11.0",
                                    "sys_platform": "linux", "platform_system": "Linux",
                                    "platform_machine": "x86_64", "implementation_name": "cpython",
                                    "platform_python_implementation": "CPython", "os_name": "posix"}


@pytest.fixture(scope="module")
def lock(repo_root) -> dict[str, str]:
    pins = {}
    for line in (repo_root / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert match, f"constraints.txt: not an exact pin: {line!r}"
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def project_requirements(repo_root: Path, extras=CLUSTER_EXTRAS) -> list[Requirement]:
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(NODE_ENV | {"extra": e}) for e in (extras or {""}))


def test_the_lock_is_complete_and_satisfies_every_requirement(lock, repo_root):
    """Every requirement of cxr-tune[gpu,aws], and recursively of each locked distribution installed
    here at its locked version, is pinned at a version that satisfies it."""
    todo = [(req, set()) for req in project_requirements(repo_root)]
    seen: set[tuple[str, frozenset]] = set()
    problems = []
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        if name not in lock:
            problems.append(f"{req} is not in constraints.txt")
            continue
        if not req.specifier.contains(lock[name], prereleases=True):
            problems.append(f"constraints.txt has {name}=={lock[name]}, which does not satisfy {req}")
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # GPU-only here: pinned, its own requirements not walkable offline
        if dist.version != lock[name]:
            continue  # checked by the next test
        todo += [(Requirement(r), set(req.extras)) for r in dist.requires or []]
    assert not problems, "constraints.txt is stale (run `make lock`):\n" + "\n".join(problems)
    assert len(seen) > 50  # the walk went deep: ray's, tensorflow's and jax's own requirements


def test_this_venv_has_the_locked_versions(lock):
    """The development venv (`make install`: -c constraints.txt) runs what the cluster nodes run."""
    differ = {}
    for name, version in lock.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if have != version:
            differ[name] = (version, have)
    assert not differ, f"locked vs installed (run `make install`): {differ}"


def test_the_lock_pins_ray_jax_with_cuda_and_the_backends(lock, repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    (ray,) = [Requirement(r) for r in project["dependencies"] if r.startswith("ray[")]
    assert {"default", "tune", "data"} <= ray.extras
    assert lock["ray"].startswith("2.60.")
    (jax,) = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    assert jax.name == "jax" and "cuda12" in jax.extras and str(jax.specifier) == f"=={lock['jax']}"
    assert lock["jax-cuda12-plugin"] == lock["jaxlib"] == lock["jax"]
    assert "tensorflow" in lock and "keras" in lock and "boto3" in lock


def test_ray_default_is_installed_job_cli_and_dashboard():
    """What `ray job submit` and a head with the dashboard need (ray[default])."""
    import ray.dashboard  # noqa: F401
    from ray.job_submission import JobSubmissionClient  # noqa: F401

    ray = Path(sys.executable).with_name("ray")
    done = subprocess.run([str(ray), "job", "submit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--submission-id" in done.stdout, done.stderr[-2000:]
    done = subprocess.run([str(ray), "symmetric-run", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--min-nodes" in done.stdout, done.stderr[-2000:]
