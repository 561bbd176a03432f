"""ray_cluster.yaml is a valid Ray cluster-launcher config (checked by Ray's own schema and defaults)."""
import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))  # fills Ray's provider defaults, as `ray up` does
    validate_config(config)
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and config["head_node_type"] == "head"
    assert types["gpu_worker"]["node_config"]["InstanceType"] == "p5.48xlarge"  # 8 x H100
    assert types["cpu_worker"]["max_workers"] > types["cpu_worker"]["min_workers"] == 0
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
    assert any("/mnt/vlp" in c for c in config["initialization_commands"])
    assert any("pip install" in c and "-e ~/vlp" in c for c in config["setup_commands"])


def test_a_broken_cluster_yaml_is_rejected_by_the_same_check():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    raw["available_node_types"]["gpu_worker"]["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))
