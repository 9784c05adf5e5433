"""The `cluster` config section: defaults, YAML sections of the shipped configs, and errors that name key and fix."""

from __future__ import annotations

import pytest

from dsa_dist.config import DEFAULT_CONFIG, load_config
from dsa_dist.config.cluster import ClusterConfig, ranks_per_node
from launch.driver import load_launch_config


def test_defaults_and_derived_ranks_per_node():
    cfg = load_config(DEFAULT_CONFIG, ["parallel.cp=2"])
    assert isinstance(cfg.cluster, ClusterConfig)
    assert cfg.cluster.dashboard_host == "127.0.0.1" and cfg.cluster.nccl_env["NCCL_NVLS_ENABLE"] == "0"
    assert ranks_per_node(cfg) == 2 and cfg.parallel.dp == 1


def test_workers_per_node_sets_the_world_size_of_a_ray_job():
    cfg = load_launch_config(DEFAULT_CONFIG, ["parallel.cp=2", "cluster.nodes=2", "cluster.workers_per_node=2"])
    assert cfg.parallel.dp == 2 and ranks_per_node(cfg) == 2  # 4 ranks = cp 2 x dp 2, two per node


def test_runtime_env_accepts_nested_values():
    cfg = load_config(DEFAULT_CONFIG, ["cluster.runtime_env.env_vars.HF_HOME=/data/hf"])
    assert cfg.cluster.runtime_env == {"env_vars": {"HF_HOME": "/data/hf"}}


@pytest.mark.parametrize("overrides,match", [
    (["cluster.nodes=0"], r"cluster.nodes=0: must be >= 1"),
    (["cluster.cpus_per_worker=0"], r"cluster.cpus_per_worker=0: must be >= 1"),
    (["cluster.max_restarts=-1"], r"cluster.max_restarts=-1: must be >= 0"),
    (["parallel.cp=2", "cluster.nodes=4"], r"cluster.nodes=4: does not divide the world size .* = 2"),
    (["parallel.tp=2", "parallel.cp=1", "cluster.nodes=2"],
     r"cluster.workers_per_node=1: not a multiple of parallel.tp=2: a tensor-parallel group would cross a node"),
    (["cluster.accelerator=tpu"], r"cluster.accelerator"),
])
def test_bad_cluster_values_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(DEFAULT_CONFIG, overrides)


def test_ray_world_size_must_match_the_parallel_sizes():
    with pytest.raises(ValueError, match=r"parallel.dp=1: world size 4 != tp\*cp\*pp\*dp"):
        load_launch_config(DEFAULT_CONFIG, ["parallel.cp=2", "parallel.dp=1", "cluster.workers_per_node=4"])
