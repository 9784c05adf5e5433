"""The ``cluster`` section of a run config: where and how ``python -m launch`` runs the ranks on Ray (docs/ray.md).

The launch layer (``launch/``) reads it; the training code never does. Ranks are packed node by node into
``cluster.nodes`` groups of ``workers_per_node`` bundles (``{GPU: 1, CPU: cpus_per_worker}`` on GPU clusters,
``{CPU: cpus_per_worker}`` on CPU ones); rank r lives on node ``r // workers_per_node``, so a tensor-parallel
group (consecutive ranks) never crosses a node.

:func:`validate_cluster` raises ``ValueError`` naming the key, the bad value and the fix, like the rest of the
config validation (``dsa_dist/config/validate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dsa_dist.config import TrainRunConfig


@dataclass
class ClusterConfig:
    """A Ray cluster job: placement of the ranks, restarts after failures, and how the driver finds Ray."""

    address: str = "auto"
    """Ray cluster to use: 'auto' connects to $RAY_ADDRESS (set by `ray job submit`) or to the cluster that
    `ray start` runs on this machine, and starts a local one when there is none; 'local' always starts a local
    one (stopped when the driver exits); 'HOST:PORT' connects to that GCS address."""
    nodes: int = 1
    """Nodes the job spans; each holds workers_per_node ranks (one STRICT_PACK placement group per node)."""
    workers_per_node: int = 0
    """Ranks per node (one GPU each on a GPU cluster, one CPU worker each otherwise); 0 derives it as
    tp*cp*pp*dp / nodes. The world size is nodes * workers_per_node (parallel.dp=0 is derived from it)."""
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"
    """'gpu': {GPU: 1, CPU: n} bundles; 'cpu': {CPU: n} bundles; 'auto': GPU bundles when the cluster has GPUs."""
    cpus_per_worker: int = 1
    """CPUs reserved per rank (data loading and the host side of the step)."""
    max_restarts: int = 3
    """How often the job rebuilds the worker group after a dead actor, a lost node or a hung collective, each
    time resuming from the latest complete checkpoint; 0 fails on the first fault."""
    restart_backoff_s: float = 5.0
    """Seconds to wait before the first restart; doubles with each further restart (capped at 5 minutes)."""
    placement_timeout_s: float = 60.0
    """Fail (naming the resource) when the placement group is not granted within this many seconds, e.g. while
    other jobs hold the GPUs; never wait forever."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Extra Ray runtime_env of the worker actors (e.g. {env_vars: {...}}, pip, container); merged over the job's
    (the working_dir of `ray job submit` is inherited). Never printed: it may hold secrets."""
    nccl_env: dict[str, str] = field(default_factory=lambda: {"NCCL_NVLS_ENABLE": "0",
                                                              "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    """Environment of the rank processes for NCCL (NVLink multicast off: shared machines require it; async error
    handling so a dead peer raises instead of hanging). Ignored by gloo on CPU."""
    num_cpus: int = 0
    """CPUs of a local cluster the driver starts itself (0: all of this machine's); unused on an existing one."""
    include_dashboard: bool = True
    """Start the dashboard and job API with a local cluster (needs ray[default]; false for a bare `ray` install)."""
    dashboard_host: str = "127.0.0.1"
    """Interface the dashboard and job API of a local cluster bind to. Keep 127.0.0.1: the job API runs arbitrary
    code for whoever reaches it (docs/ray.md explains how to protect a multi-node cluster)."""


def ranks_per_node(cfg: TrainRunConfig) -> int:
    """``cluster.workers_per_node``, or the world size divided by ``cluster.nodes`` when it is 0."""
    c, p = cfg.cluster, cfg.parallel
    return c.workers_per_node or p.tp * p.cp * p.pp * max(p.dp, 1) // c.nodes


def validate_cluster(cfg: TrainRunConfig) -> None:
    """Check ``cfg.cluster`` against itself and the (resolved) parallel layout; ``ValueError`` names the fix."""
    from dsa_dist.config.validate import require as _require  # late: validate.py imports this module

    c, p = cfg.cluster, cfg.parallel
    _require(c.nodes >= 1, "cluster.nodes", c.nodes, "must be >= 1")
    _require(c.workers_per_node >= 0, "cluster.workers_per_node", c.workers_per_node,
             "must be >= 1, or 0 to derive it from the parallel sizes")
    _require(c.cpus_per_worker >= 1, "cluster.cpus_per_worker", c.cpus_per_worker, "must be >= 1")
    _require(c.max_restarts >= 0, "cluster.max_restarts", c.max_restarts, "must be >= 0 (0: no restart)")
    _require(c.restart_backoff_s >= 0, "cluster.restart_backoff_s", c.restart_backoff_s, "must be >= 0")
    _require(c.placement_timeout_s > 0, "cluster.placement_timeout_s", c.placement_timeout_s, "must be > 0")
    _require(c.num_cpus >= 0, "cluster.num_cpus", c.num_cpus, "must be >= 0 (0: all CPUs of this machine)")
    _require(bool(c.address), "cluster.address", c.address, "use 'auto', 'local' or HOST:PORT")
    world = p.tp * p.cp * p.pp * max(p.dp, 1)
    if c.workers_per_node == 0:
        _require(world % c.nodes == 0, "cluster.nodes", c.nodes,
                 f"does not divide the world size tp*cp*pp*dp = {world}; set cluster.workers_per_node or "
                 "change the parallel sizes")
    per_node = ranks_per_node(cfg)
    _require(c.nodes * per_node == world, "cluster.workers_per_node", c.workers_per_node,
             f"nodes*workers_per_node = {c.nodes * per_node} ranks != tp*cp*pp*dp = {world}; set parallel.dp=0 "
             "to derive it, or change the sizes")
    _require(per_node % p.tp == 0, "cluster.workers_per_node", per_node,
             f"not a multiple of parallel.tp={p.tp}: a tensor-parallel group would cross a node; use a multiple "
             "of tp ranks per node")
