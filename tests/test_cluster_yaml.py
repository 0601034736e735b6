"""cluster.yaml and cluster.local.yaml pass Ray's own cluster-config checks (the ones `ray up` runs)."""

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_config_passes_ray_schema_and_validation(name):
    config = load(name)
    jsonschema.validate(config, SCHEMA)  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # after Ray fills its defaults, as `ray up` does


def test_cloud_example_has_cpu_head_autoscaling_gpu_workers_and_kafka():
    config = load("cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and gpu[0]["min_workers"] < gpu[0]["max_workers"]  # the autoscaler adds and removes them
    commands = " ".join(config["setup_commands"])
    assert "LSVCR_KAFKA_BOOTSTRAP=" in commands and "scripts/venv.sh" in commands


def test_local_example_lists_hosts():
    config = load("cluster.local.yaml")
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and len(config["provider"]["worker_ips"]) >= 1


def test_schema_check_catches_a_misspelt_key():
    config = load("cluster.yaml")
    config["available_node_types"]["gpu_worker"]["max_worker"] = 4  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, SCHEMA)
