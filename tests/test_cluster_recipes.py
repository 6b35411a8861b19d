"""The offline checks of the recipes that cannot run here (no Docker daemon, no Kubernetes, no
Slurm): the Dockerfile, the KubeRay RayJob manifest and its storage, the Slurm sbatch script.

- Dockerfile: Ray's GPU image at the locked Ray version; every file it copies exists and is not
  ignored; the copied files alone build the project's wheel (a real build, offline).
- cluster/rayjob.yaml: the fields KubeRay's v1 RayJob CRD requires and their types (a schema
  written from the CRD, ray.io_rayjobs.yaml), images pinned to the project's version, rayVersion =
  the locked Ray, the entrypoint accepted by `cxr`'s own parser, the claim it mounts defined.
- cluster/slurm.sbatch: `bash -n`; its dry-run mode run with a fake Slurm environment prints one
  `srun ... ray symmetric-run ... -- cxr search ...` that Ray's own `symmetric-run` and `ray start`
  option parsers and `cxr`'s parser accept.
"""
from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

# ----------------------------------------------------------------------------- shared


def locked(repo_root: Path, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)", (repo_root / "constraints.txt").read_text(), re.M)
    assert match, f"{name} is not pinned in constraints.txt"
    return match.group(1)


def project_version(repo_root: Path) -> str:
    return tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["version"]


def parse_cxr(argv: list[str]):
    """`cxr`'s own argument parser on a command line (exits, and so fails the test, on a bad flag)."""
    from cxr_search.main import build_parser

    assert argv[0] == "cxr", argv
    return build_parser().parse_args(argv[1:])


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(repo_root: Path) -> list[tuple[str, str]]:
    text = (repo_root / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def copies(instructions) -> list[tuple[list[str], str]]:
    """[(sources, destination)] of every COPY, flags (--chown) left out."""
    out = []
    for op, args in instructions:
        if op == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            out.append((parts[:-1], parts[-1]))
    return out


def test_dockerfile_builds_on_rays_gpu_image_at_the_locked_version(repo_root):
    instructions = dockerfile_instructions(repo_root)
    froms = [args for op, args in instructions if op == "FROM"]
    assert froms == [f"rayproject/ray:{locked(repo_root, 'ray')}-py311-gpu"]
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "-r constraints.txt" in runs and "-c constraints.txt '.[gpu]'" in runs
    assert ("ENV", "KERAS_BACKEND=jax") in instructions


def test_dockerfile_copies_only_what_exists_and_is_not_ignored(repo_root):
    ignored = {line.strip() for line in (repo_root / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    sources = [src for srcs, _ in copies(dockerfile_instructions(repo_root)) for src in srcs]
    assert {"constraints.txt", "pyproject.toml", "datasets", "cxr_model", "search"} <= set(sources)
    for src in sources:
        assert (repo_root / src).exists(), src
        assert src not in ignored and src.split("/")[0] not in ignored, src
    assert {".venv", "runs", ".git"} <= ignored  # the context stays small: no venv, no runs


def test_the_files_the_image_copies_build_the_project(repo_root, tmp_path):
    """Lay out the build context as the Dockerfile's COPY lines do, then build the wheel there
    (offline: no build isolation), as `pip install '.[gpu]'` in the image does."""
    context = tmp_path / "image"
    for sources, dest in copies(dockerfile_instructions(repo_root)):
        for src in sources:
            target = context / (dest.rstrip("/") if not dest.endswith("/") and dest not in (".", "./")
                                else Path(dest) / Path(src).name)
            if (repo_root / src).is_dir():
                shutil.copytree(repo_root / src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(repo_root / src, target)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "wheel"), str(context)], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("cxr_tune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # every installed top-level name is cxr-tune's own (pyproject.toml's package-dir): no `datasets`
    # or `search` that would shadow another distribution's package
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == \
        {"cxr_datasets", "cxr_model", "cxr_search"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cxr = cxr_search.main:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()


# ----------------------------------------------------------------------------- KubeRay

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
_POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {
        "type": "object", "required": ["containers"],
        "properties": {
            "containers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "image"],
                "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                               "resources": {"type": "object",
                                             "properties": {"requests": _QUANTITIES, "limits": _QUANTITIES}},
                               "volumeMounts": {"type": "array", "items": {
                                   "type": "object", "required": ["mountPath", "name"]}}}}},
            "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        }}},
}
# The part of KubeRay's v1 RayJob CRD (ray-operator/config/crd/bases/ray.io_rayjobs.yaml) that
# this manifest uses: required fields and types as the CRD declares them, rayStartParams values
# strings (the CRD's map of string; `num-cpus: 0` is refused by the API server).
RAYJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer"},
                "rayClusterSpec": {
                    "type": "object", "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {"type": "object", "required": ["template"],
                                          "properties": {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE}},
                        "workerGroupSpecs": {"type": "array", "items": {
                            "type": "object", "required": ["groupName", "template"],
                            "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                                           "minReplicas": {"type": "integer"},
                                           "maxReplicas": {"type": "integer"},
                                           "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE}}},
                    }},
            }},
    },
}


@pytest.fixture(scope="module")
def rayjob(repo_root):
    return yaml.safe_load((repo_root / "cluster" / "rayjob.yaml").read_text())


def pods(rayjob) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_rayjob_has_the_fields_kuberay_requires(rayjob):
    jsonschema.validate(rayjob, RAYJOB_SCHEMA)
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head takes no trials
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_schema_check_can_fail(rayjob):
    # Guards the test itself: an int where the CRD wants a string, a missing group name.
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYJOB_SCHEMA)
    broken = copy.deepcopy(rayjob)
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYJOB_SCHEMA)


def test_rayjob_pins_the_project_image_and_the_locked_ray(rayjob, repo_root):
    images = {c["image"] for pod in pods(rayjob) for c in pod["containers"]}
    assert len(images) == 1  # one image on every node: the same versions everywhere
    (image,) = images
    assert image.rsplit(":", 1)[1] == project_version(repo_root)  # a tag, and not :latest
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == locked(repo_root, "ray")


def test_rayjob_entrypoint_is_a_valid_cxr_command_on_the_shared_claim(rayjob, repo_root):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    args = parse_cxr(argv)
    assert args.command == "search" and args.address == "auto"
    mounts = {m["mountPath"] for pod in pods(rayjob) for c in pod["containers"] for m in c["volumeMounts"]}
    assert mounts == {"/data"}  # every pod, the same claim
    for path in (args.prepared, args.out, args.storage):  # the driver's and the trials' files
        assert path.startswith("/data/"), path
    claims = {v["persistentVolumeClaim"]["claimName"] for pod in pods(rayjob) for v in pod["volumes"]}
    storage_docs = list(yaml.safe_load_all((repo_root / "cluster" / "k8s-data.yaml").read_text()))
    pvc = next(d for d in storage_docs if d["kind"] == "PersistentVolumeClaim")
    assert claims == {pvc["metadata"]["name"]} and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = next(d for d in storage_docs if d["kind"] == "Pod")
    assert re.fullmatch(r"busybox:[0-9.]+", pod["spec"]["containers"][0]["image"])  # pinned


# ----------------------------------------------------------------------------- Slurm

SBATCH = Path("cluster") / "slurm.sbatch"


def test_sbatch_script_is_valid_bash(repo_root):
    done = subprocess.run(["bash", "-n", str(repo_root / SBATCH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sbatch_directives_ask_for_one_task_per_node(repo_root):
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", (repo_root / SBATCH).read_text(), re.M))
    assert directives["ntasks-per-node"] == "1" and int(directives["nodes"]) >= 2
    assert "cpus-per-task" in directives and "gpus-per-node" in directives


def dry_run(repo_root: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "CXR_DRY_RUN": "1", "CXR_VENV": sys.prefix}
    return subprocess.run(["bash", str(repo_root / SBATCH), *args], capture_output=True, text=True,
                          env=base | env, cwd=repo_root, timeout=120)


def test_sbatch_dry_run_prints_a_symmetric_run_that_ray_and_cxr_accept(repo_root):
    from ray.scripts.scripts import start as ray_start
    from ray.scripts.symmetric_run import curate_and_validate_ray_start_args, symmetric_run
    from ray.util import get_node_ip_address

    done = dry_run(repo_root, ["/shared/prepared", "--out", "/shared/runs/s1", "--trials", "64"],
                   SLURM_JOB_NUM_NODES="3", SLURM_CPUS_PER_TASK="16", SLURM_JOB_ID="4242",
                   SLURM_SUBMIT_DIR=str(repo_root))
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()  # one command, nothing run
    argv = shlex.split(line)
    # Ray's token authentication on every node, the token in a per-user file all nodes see
    assert argv[:3] == ["env", "RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN_PATH={Path.home()}/.ray/auth_token"]
    argv = argv[3:]
    assert argv[:4] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
    assert argv[4:6] == ["ray", "symmetric-run"]
    ray_args, entrypoint = argv[6:argv.index("--")], argv[argv.index("--") + 1:]
    # Ray's own parsers: symmetric-run's options, then what it passes on to `ray start`
    ctx = symmetric_run.make_context("symmetric-run", ray_args + ["--"] + entrypoint)
    assert ctx.params["address"] == f"{get_node_ip_address()}:6379" and ctx.params["min_nodes"] == 3
    start_args = curate_and_validate_ray_start_args(ray_args + ["--"] + entrypoint)
    start_args = start_args[:start_args.index("--")] if "--" in start_args else start_args
    start_args = [a for a in start_args if a not in entrypoint]
    start_ctx = ray_start.make_context("start", list(start_args))
    assert start_ctx.params["num_cpus"] == 16 and start_ctx.params["temp_dir"] == "/tmp/ray-4242"
    args = parse_cxr(entrypoint)
    assert (args.command, args.prepared, args.out, args.trials, args.address) == \
        ("search", "/shared/prepared", "/shared/runs/s1", 64, "auto")


def test_sbatch_makes_a_token_only_its_user_can_read(repo_root, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\necho \"$RAY_AUTH_MODE $RAY_AUTH_TOKEN_PATH\"\n")
    (fake / "srun").chmod(0o755)
    token = tmp_path / "home" / ".ray" / "auth_token"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "CXR_VENV": sys.prefix,
           "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "4"}
    done = subprocess.run(["bash", str(repo_root / SBATCH), "/shared/prepared", "--out", "/shared/runs/s1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["token", str(token)]
    assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o077 == 0
    first = token.read_text().strip()
    assert len(first) == 64 and int(first, 16) >= 0
    done = subprocess.run(["bash", str(repo_root / SBATCH), "/shared/prepared", "--out", "/shared/runs/s1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and token.read_text().strip() == first  # kept: every job of the user shares it


def test_sbatch_outside_slurm_says_what_is_missing(repo_root):
    done = dry_run(repo_root, ["/shared/prepared", "--out", "/shared/runs/s1"])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == ("slurm.sbatch: error: not inside a Slurm job (no SLURM_JOB_NUM_NODES): "
                                   "submit with sbatch")
    done = dry_run(repo_root, [], SLURM_JOB_NUM_NODES="2", SLURM_CPUS_PER_TASK="4")
    assert done.returncode == 2 and "usage: sbatch cluster/slurm.sbatch PREPARED" in done.stderr


# ----------------------------------------------------------------------------- AWS IAM


def test_aws_iam_script_makes_the_profiles_cluster_yaml_names(repo_root):
    import json

    script = repo_root / "cluster" / "aws-iam.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script), "my-bucket", "runs/cxr/"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "CXR_DRY_RUN": "1"})
    assert done.returncode == 0, done.stderr
    calls = [shlex.split(line) for line in done.stdout.splitlines()]
    assert all(c[:2] == ["aws", "iam"] for c in calls)
    profiles = {c[c.index("--instance-profile-name") + 1] for c in calls if c[2] == "create-instance-profile"}
    config = yaml.safe_load((repo_root / "cluster.yaml").read_text())
    named = {t["node_config"]["IamInstanceProfile"]["Name"] for t in config["available_node_types"].values()}
    assert profiles == named == {"cxr-tune-head", "cxr-tune-worker"}
    policies = {}
    for call in calls:  # every policy document is valid JSON
        if "--policy-document" in call:
            policy = json.loads(call[call.index("--policy-document") + 1])
            role = call[call.index("--role-name") + 1]
            policies.setdefault(role, []).extend(policy["Statement"])
    assert not any(c[2] == "attach-role-policy" for c in calls)  # no managed policy (EC2 full access)
    for role in ("cxr-tune-worker", "cxr-tune-head"):
        statements = [s for s in policies[role] if any(a.startswith("s3:") for a in _actions(s))]
        # S3 under the run's prefix only: objects there, and listing only that prefix
        for s in statements:
            if "s3:ListBucket" in _actions(s):
                assert s["Resource"] == ["arn:aws:s3:::my-bucket"]
                assert s["Condition"] == {"StringLike": {"s3:prefix": ["runs/cxr/*"]}}
            else:
                assert s["Resource"] == ["arn:aws:s3:::my-bucket/runs/cxr/*"]
    assert not any(a.startswith("ec2:") or a.startswith("iam:") for s in policies["cxr-tune-worker"] for a in _actions(s))
    head = policies["cxr-tune-head"]
    assert not any("*" in a for s in head for a in _actions(s))  # named actions only
    for s in head:
        if {"ec2:TerminateInstances", "ec2:StopInstances"} & set(_actions(s)):  # only this cluster's nodes
            assert s["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": config["cluster_name"]}}
        if "iam:PassRole" in _actions(s):
            assert all("cxr-tune-worker" in r for r in s["Resource"])
    assert subprocess.run(["bash", str(script)], capture_output=True, env={"PATH": "/usr/bin:/bin"}).returncode == 2


def _actions(statement) -> list[str]:
    actions = statement["Action"]
    return [actions] if isinstance(actions, str) else actions


# ----------------------------------------------------------------------------- KubeRay network


def test_rayjob_uses_rays_token_and_only_its_own_pods_and_the_operator_reach_them(rayjob, repo_root):
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    policy = yaml.safe_load((repo_root / "cluster" / "k8s-network.yaml").read_text())
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:  # every Ray pod is covered by the policy
        assert selected.items() <= template["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule
    peers = rule["from"]
    assert {"podSelector": {"matchLabels": selected}} in peers  # the cluster's own pods
    # the RayJob's submitter: the Kubernetes Job named after the RayJob
    assert {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": rayjob["metadata"]["name"]}}} in peers
    operator = [p for p in peers if "namespaceSelector" in p]
    assert operator == [{"namespaceSelector": {},
                         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert len(peers) == 3  # nothing else
