"""cluster.yaml is accepted by Ray's own cluster-launcher validator (the Ray version pinned here)."""
from __future__ import annotations

import copy

import pytest
import yaml


@pytest.fixture(scope="module")
def cluster_config(repo_root):
    return yaml.safe_load((repo_root / "cluster.yaml").read_text())


def _prepared(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validator(cluster_config):
    prepared = _prepared(cluster_config)
    assert prepared["provider"]["type"] == "aws"


def test_head_takes_no_trials_and_workers_have_gpus(cluster_config):
    types = _prepared(cluster_config)["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = [t for name, t in types.items() if name != cluster_config["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)  # autoscaling


def test_project_is_synced_and_installed(cluster_config):
    assert "." in cluster_config["file_mounts"].values()
    assert any("pip install" in c and "cxr-tune" in c for c in cluster_config["setup_commands"])


def test_validator_rejects_a_broken_config(cluster_config):
    # Guards the test itself: the validator must actually look at the node types.
    import jsonschema

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["head"]["resources"] = "CPU=0"
    with pytest.raises(jsonschema.ValidationError):
        _prepared(broken)
