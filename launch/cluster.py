"""Generic Ray machinery: connect, check resources, place ranks node by node, start and kill a worker group.

Nothing here knows about models or training (verl's split: this module / coarse worker methods in
``launch/worker.py`` / the training code they call). docs/ray.md describes the layout.

Placement: one ``STRICT_PACK`` placement group per node, each of ``ranks_per_node`` bundles (``{GPU: 1, CPU: n}``
or ``{CPU: n}``). Groups are ordered by (node IP, node id) and bundles by index, and rank r gets bundle
``r % ranks_per_node`` of group ``r // ranks_per_node``: consecutive ranks -- a tensor-parallel group -- share a
node. Before asking Ray for the groups the cluster's totals and its largest node are checked, so an impossible
request fails at once with the missing resource named; a possible one that is not granted within
``timeout_s`` (other jobs hold the resources) fails too, never waiting forever.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class ResourceError(RuntimeError):
    """The cluster cannot (or did not in time) provide what the job asks for; the message names the resource."""


class NonRetryableError(RuntimeError):
    """Raised by a worker for a failure that a restart cannot fix (bad config, unreadable checkpoint)."""


@dataclass(frozen=True)
class GroupSpec:
    """What a worker group needs: ``nodes`` x ``ranks_per_node`` bundles of ``cpus`` CPUs (+ 1 GPU if ``gpu``)."""

    nodes: int
    ranks_per_node: int
    cpus: int
    gpu: bool

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def bundle(self) -> dict[str, float]:
        return {"CPU": float(self.cpus), **({"GPU": 1.0} if self.gpu else {})}


def _latest_cluster() -> str | None:
    """GCS address of this machine's latest `ray start` cluster when it is still up (Ray keeps the address in
    <ray temp dir>/ray_current_cluster even after the cluster stopped; joining a dead one would hang)."""
    try:
        address = ray._private.utils.read_ray_address(None)
    except Exception:  # noqa: BLE001 - no record, or another Ray layout: treat as no cluster
        return None
    if not address or ":" not in address:
        return None
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        return None


def connect(address: str, *, num_cpus: int = 0, include_dashboard: bool = True, dashboard_host: str = "127.0.0.1",
            runtime_env: dict | None = None) -> str:
    """``ray.init`` for a driver: join ``address`` ('auto', 'local' or HOST:PORT). 'auto' joins $RAY_ADDRESS (set
    by `ray job submit`) or this machine's running cluster, else starts a local one (dashboard and job API on
    ``dashboard_host``). Returns 'connected to' or 'started'."""
    if ray.is_initialized():
        return "connected to"
    quiet = {"log_to_driver": True, "logging_level": "warning", "runtime_env": runtime_env}
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or _latest_cluster() or "local"
    if address != "local":
        ray.init(address=address, **quiet)
        return "connected to"
    ray.init(address="local", num_cpus=num_cpus or None, include_dashboard=include_dashboard,
             dashboard_host=dashboard_host, **quiet)
    return "started"


def cluster_gpus() -> int:
    """GPUs of the alive nodes."""
    return int(sum(n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]))


def check_resources(spec: GroupSpec) -> None:
    """Raise :class:`ResourceError` naming the resource when the alive nodes cannot hold ``spec`` at all."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    need = spec.bundle()
    for res, per_rank in need.items():
        total = sum(r.get(res, 0.0) for r in nodes)
        if total < per_rank * spec.world_size:
            raise ResourceError(
                f"the cluster has {total:g} {res} in {len(nodes)} alive node(s), the job needs "
                f"{per_rank * spec.world_size:g} {res} ({spec.world_size} ranks x {per_rank:g} {res}; "
                f"cluster.nodes={spec.nodes}, {spec.ranks_per_node} ranks per node). Add nodes, or lower the "
                "parallel sizes / cluster.cpus_per_worker")

    def groups_on(r: dict) -> int:  # how many per-node groups fit on a node with resources r
        return int(min(r.get(res, 0.0) // (per_rank * spec.ranks_per_node) for res, per_rank in need.items()))

    fits = sum(groups_on(r) for r in nodes)
    if fits < spec.nodes:
        largest = {res: max(r.get(res, 0.0) for r in nodes) for res in need}
        short = [res for res, per_rank in need.items() if largest[res] < per_rank * spec.ranks_per_node]
        what = short[0] if short else next(iter(need))
        raise ResourceError(
            f"{spec.nodes} node(s) with {spec.ranks_per_node} x {need} each are needed, but only {fits} node "
            f"group(s) fit: the largest node has {largest[what]:g} {what} and {spec.ranks_per_node} ranks need "
            f"{need[what] * spec.ranks_per_node:g} {what} on one node. Lower cluster.workers_per_node (raise "
            "cluster.nodes) or cluster.cpus_per_worker")


@dataclass
class Placement:
    """The granted placement groups and, per rank, its (group, bundle index)."""

    groups: list[PlacementGroup]
    slots: list[tuple[PlacementGroup, int]]

    def strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        pg, index = self.slots[rank]
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)

    def remove(self) -> None:
        for pg in self.groups:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already gone with its node or the job
                pass


def place(spec: GroupSpec, timeout_s: float) -> Placement:
    """Reserve one STRICT_PACK group per node and order the ranks node by node (module docstring)."""
    check_resources(spec)
    groups = [placement_group([spec.bundle()] * spec.ranks_per_node, strategy="STRICT_PACK")
              for _ in range(spec.nodes)]
    placement = Placement(groups, [])
    try:
        ray.get([pg.ready() for pg in groups], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        placement.remove()
        free = ray.available_resources()
        raise ResourceError(
            f"the placement of {spec.nodes} x {spec.ranks_per_node} bundles {spec.bundle()} was not granted within "
            f"{timeout_s:g}s (cluster.placement_timeout_s); available now: "
            f"{ {k: v for k, v in free.items() if k in ('CPU', 'GPU')} }. Other jobs may hold the resources") from None
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}

    def node_key(pg: PlacementGroup) -> tuple[str, str]:
        node_id = placement_group_table(pg)["bundles_to_node_id"][0]
        return nodes.get(node_id, ""), node_id

    groups.sort(key=node_key)
    placement.groups = groups
    placement.slots = [(pg, i) for pg in groups for i in range(spec.ranks_per_node)]
    return placement


class WorkerGroup:
    """One actor of ``worker_cls`` per rank on a :class:`Placement`; ``kill`` removes actors and placement."""

    def __init__(self, worker_cls: type, spec: GroupSpec, placement: Placement, *,
                 runtime_env: dict | None = None, args: tuple = ()) -> None:
        remote = ray.remote(worker_cls)
        self.placement = placement
        self.actors = [
            remote.options(num_cpus=spec.cpus, num_gpus=1 if spec.gpu else 0, max_restarts=0,
                           scheduling_strategy=placement.strategy(rank), runtime_env=runtime_env)
            .remote(rank, *args)
            for rank in range(spec.world_size)
        ]

    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Call ``method`` on every actor; one ObjectRef per rank."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def kill(self) -> None:
        """Kill every actor (SIGKILL, also a stopped one) and free the placement groups."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.placement.remove()


def wait_all(refs: list[ray.ObjectRef], *, root_cause_grace_s: float = 3.0) -> list:
    """Results of ``refs`` in order; raises the first failure as soon as it happens (not after the others).

    When one rank dies, its peers fail too, usually first: their collective loses the connection. Before raising a
    rank's error, the others get ``root_cause_grace_s`` to finish failing, and a dead actor (the root cause) is
    reported in preference to the peers' collective errors.
    """
    pending = list(refs)
    while pending:
        # A bounded wait returns to Python every second, so SIGTERM (`ray job stop`) and Ctrl-C are handled at once.
        done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        try:
            ray.get(done)
        except ray.exceptions.RayError as first:
            if isinstance(first, ray.exceptions.RayActorError) or not pending:
                raise
            more, _ = ray.wait(pending, num_returns=len(pending), timeout=root_cause_grace_s)
            for ref in more:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as died:
                    raise died from first
                except ray.exceptions.RayError:
                    pass
            raise
    return ray.get(refs)


def node_address() -> tuple[str, str, int]:
    """(node IP, node id, pid) of the calling actor."""
    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(), os.getpid()


def free_port() -> int:
    """A TCP port that is free on this node right now (rank 0's rendezvous port)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
