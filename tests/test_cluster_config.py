"""The cluster-launcher configs (cluster.yaml for AWS, cluster/gcp.yaml) are accepted by Ray's own
validator (the Ray version pinned here), and say what README.md promises: a head that takes no
trials, autoscaling GPU workers, Ray's GPU image at the locked Ray version, the project installed
from the lock on every node, storage access for head and workers."""
from __future__ import annotations

import copy
import re

import pytest
import yaml

CONFIGS = ["cluster.yaml", "cluster/gcp.yaml"]


@pytest.fixture(scope="module", params=CONFIGS)
def cluster_config(request, repo_root):
    return yaml.safe_load((repo_root / request.param).read_text())


def _prepared(config):
    from cxr_search.ray_adapter import validate_cluster_config  # Ray's validator has no public API

    return validate_cluster_config(config)


def locked_version(repo_root, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)", (repo_root / "constraints.txt").read_text(), re.M)
    assert match, f"{name} is not pinned in constraints.txt"
    return match.group(1)


def test_config_passes_rays_validator(cluster_config):
    prepared = _prepared(cluster_config)
    assert prepared["provider"]["type"] in ("aws", "gcp")


def test_head_takes_no_trials_and_workers_have_gpus(cluster_config):
    types = _prepared(cluster_config)["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = [t for name, t in types.items() if name != cluster_config["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)  # autoscaling


def test_every_node_runs_rays_gpu_image_at_the_locked_version(cluster_config, repo_root):
    ray = locked_version(repo_root, "ray")
    assert cluster_config["docker"]["image"] == f"rayproject/ray:{ray}-py311-gpu"
    assert not {"head_image", "worker_image"} & set(cluster_config["docker"])  # one image everywhere
    # Keras's backend is set for every process of the container, the driver's included
    assert "--env KERAS_BACKEND=jax" in cluster_config["docker"]["run_options"]


def test_project_is_synced_and_installed_from_the_lock(cluster_config):
    target = next(k for k, v in cluster_config["file_mounts"].items() if v == ".")
    install = " ".join(cluster_config["setup_commands"])
    assert f"-c {target}/constraints.txt" in install and f"{target}[gpu]" in install


def test_head_and_workers_can_reach_the_storage(cluster_config):
    types = cluster_config["available_node_types"]
    head, workers = types[cluster_config["head_node_type"]], [
        t for name, t in types.items() if name != cluster_config["head_node_type"]]
    if cluster_config["provider"]["type"] == "aws":
        # named instance profiles (README.md creates them), not Ray's default, on every node
        assert head["node_config"]["IamInstanceProfile"] == {"Name": "cxr-tune-head"}
        assert all(w["node_config"]["IamInstanceProfile"] == {"Name": "cxr-tune-worker"} for w in workers)
        # an explicit host image: Ray's fallback AMI is Ubuntu 18.04, too old for CUDA 12
        assert all(t["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/")
                   for t in types.values())
    else:
        # the head gets Ray's service account; workers need it given, with the cloud-platform scope
        for w in workers:
            (account,) = w["node_config"]["serviceAccounts"]
            assert account["email"].startswith("ray-autoscaler-sa-v1@")
            assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]
            # GCE wants an object here (a list, as in some of Ray's examples, is refused)
            assert isinstance(w["node_config"]["scheduling"], dict)
            assert w["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


def test_ray_needs_its_token_and_the_dashboard_stays_on_loopback(cluster_config):
    """Ray's token authentication on every process of every node (the token file copied from the
    user's machine), and the dashboard/job API on the head's 127.0.0.1, reached by SSH tunnel."""
    assert "--env RAY_AUTH_MODE=token" in cluster_config["docker"]["run_options"]
    assert cluster_config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    (head_start,) = [c for c in cluster_config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    starts = cluster_config["head_start_ray_commands"] + cluster_config["worker_start_ray_commands"]
    assert not any("0.0.0.0" in c for c in starts)


def test_validator_rejects_a_broken_config(cluster_config):
    # Guards the test itself: the validator must actually look at the node types.
    import jsonschema

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["head"]["resources"] = "CPU=0"
    with pytest.raises(jsonschema.ValidationError):
        _prepared(broken)
