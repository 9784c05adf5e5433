"""Two Ray nodes on one machine (``ray.cluster_utils.Cluster``): node-by-node placement, resource errors that name
the resource within seconds, and a job that loses a node mid-run (restart on what is left, or a clean failure)."""

from __future__ import annotations

import os
import time

import pytest

from tests.launch.conftest import (
    REPO,
    checkpoint_exists,
    cluster_pids,
    finish,
    job_overrides,
    rank_pid,
    stage_losses,
    start_driver,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def two_nodes(request, ray_token, monkeypatch):
    """A head without CPUs and two worker nodes of ``request.param`` CPUs each (default 2)."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cpus = getattr(request, "param", 2)
    # Fast node-death detection: a removed raylet is declared dead after ~3 s instead of ~30 s.
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": system})
    nodes = [cluster.add_node(num_cpus=cpus) for _ in range(2)]
    cluster.wait_for_nodes()
    port = int(cluster.address.rsplit(":", 1)[1])
    try:
        yield cluster, nodes
    finally:
        cluster.shutdown()
        try:
            wait_for(lambda: not cluster_pids(port), 30, "the two-node cluster's processes to exit")
        except TimeoutError:
            raise AssertionError(f"Ray processes left behind: {cluster_pids(port)}") from None


def test_placement_packs_ranks_node_by_node_and_names_missing_resources(two_nodes):
    import ray

    from launch.cluster import GroupSpec, ResourceError, WorkerGroup, place, wait_all
    from tests.launch._probe import Probe

    cluster, nodes = two_nodes
    ray.init(address=cluster.address, logging_level="warning")
    try:
        spec = GroupSpec(nodes=2, ranks_per_node=2, cpus=1, gpu=False)
        group = WorkerGroup(Probe, spec, place(spec, timeout_s=60))
        where = [w["node_id"] for w in wait_all(group.call("where"))]
        # Ranks 0,1 share a node, ranks 2,3 the other: a TP=2 group never crosses a node.
        assert where[0] == where[1] != where[2] == where[3]
        assert set(where) == {n.node_id for n in nodes}

        # Everything is taken now: a possible request that is not granted fails after the timeout, not never.
        t0 = time.monotonic()
        with pytest.raises(ResourceError, match="not granted within 3s"):
            place(GroupSpec(nodes=1, ranks_per_node=1, cpus=1, gpu=False), timeout_s=3)
        assert time.monotonic() - t0 < 20
        group.kill()

        # Impossible requests fail at once, naming the resource.
        t0 = time.monotonic()
        with pytest.raises(ResourceError, match="GPU"):
            place(GroupSpec(nodes=1, ranks_per_node=2, cpus=1, gpu=True), timeout_s=60)
        with pytest.raises(ResourceError, match="the cluster has 4 CPU.*needs 6 CPU"):
            place(GroupSpec(nodes=2, ranks_per_node=3, cpus=1, gpu=False), timeout_s=60)
        with pytest.raises(ResourceError, match="largest node has 2 CPU and 3 ranks need 3 CPU on one node"):
            place(GroupSpec(nodes=1, ranks_per_node=3, cpus=1, gpu=False), timeout_s=60)
        assert time.monotonic() - t0 < 10
    finally:
        ray.shutdown()


def _run_and_remove_node(cluster, nodes, tmp_path, rank: int, *extra: str):
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    proc = start_driver(job_overrides(run_dir, pipeline="[dense]", cluster__address=cluster.address)
                        + list(extra), log)
    try:
        wait_for(lambda: checkpoint_exists(run_dir, "dense", 2) or proc.poll() is not None, 240,
                 "the first checkpoint", interval=0.02)
        lost = rank_pid(run_dir, 0, rank)["node_id"]
        assert not checkpoint_exists(run_dir, "dense", 8), "the stage ended before the fault"
        cluster.remove_node(next(n for n in nodes if n.node_id == lost), allow_graceful=False)
    except BaseException:
        proc.kill()
        raise
    rc, out = finish(proc, log, timeout=400)
    return run_dir, rc, out, lost


def test_losing_a_node_restarts_on_the_remaining_one(two_nodes, submitted_job, tmp_path):
    cluster, nodes = two_nodes
    run_dir, rc, out, lost = _run_and_remove_node(cluster, nodes, tmp_path, rank=0)
    assert rc == 0, out[-6000:]
    assert "Restart 1/2" in out
    after = [rank_pid(run_dir, 1, r)["node_id"] for r in (0, 1)]
    assert lost not in after and after[0] == after[1]
    assert stage_losses(run_dir, "dense") == stage_losses(submitted_job.run_dir, "dense")


@pytest.mark.parametrize("two_nodes", [1], indirect=True)
def test_losing_a_node_with_too_few_resources_left_fails_cleanly(two_nodes, tmp_path):
    cluster, nodes = two_nodes  # 1 CPU per node: after the loss only 1 of the 2 ranks fits
    run_dir, rc, out, _ = _run_and_remove_node(cluster, nodes, tmp_path, 1, "cluster.nodes=2",
                                               "cluster.placement_timeout_s=10")
    assert rc == 1, out[-6000:]
    assert "Restart 1/2" in out
    failure = next(line for line in out.splitlines() if line.startswith("launch: job failed:"))
    assert "after 1 restart(s)" in failure and "CPU" in failure
    # The checkpoints survive for a resubmit. Which ones depends on how far the stage got before the node was
    # gone (on a loaded machine it can pass step 6, and keep_last=2 then has removed step 2).
    assert any(checkpoint_exists(run_dir, "dense", step) for step in range(2, 9, 2))
