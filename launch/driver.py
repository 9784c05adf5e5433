"""The Ray job driver: run every configured stage on a worker group, rebuilding the group after a failure.

``python -m launch CONFIG.yaml [key=value ...]``, submitted with
``ray job submit --address http://HEAD:8265 --working-dir . -- python -m launch CONFIG.yaml`` (docs/ray.md).

Self-healing: when an actor or its node dies, or a rank's collective times out (``parallel.timeout_s``;
a stopped or hung peer makes the others raise), the whole group is torn down (every actor killed, the placement
groups removed), and after ``cluster.restart_backoff_s`` (doubling each time) a new group resumes from the latest
complete checkpoint of the unfinished stage -- the trainer restores model, optimizer, data position and RNG, so
the steps after a restart repeat an uninterrupted run exactly (bitwise on CPU). After ``cluster.max_restarts``
restarts, or when the cluster no longer has the resources, the job fails with a message saying what happened.
SIGTERM (``ray job stop``) and Ctrl-C kill the group before the driver exits.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import ray
from omegaconf import OmegaConf

from dsa_dist.config import DEFAULT_CONFIG, TrainRunConfig, load_config
from dsa_dist.config.cluster import ranks_per_node
from dsa_dist.train.cli import quiet_known_warnings
from launch.cluster import (
    GroupSpec,
    NonRetryableError,
    ResourceError,
    WorkerGroup,
    cluster_gpus,
    connect,
    place,
    wait_all,
)
from launch.report import summary_table

USAGE = """usage: python -m launch [CONFIG.yaml] [key=value ...]

  CONFIG.yaml   run config (default: configs/tiny.yaml); its `cluster:` section says how to run on Ray
  key=value     overrides, e.g. parallel.cp=2 cluster.max_restarts=5 cluster.address=auto

Submit to a cluster:  ray job submit --address http://HEAD:8265 --working-dir . -- python -m launch CONFIG.yaml
See docs/ray.md."""

_MAX_BACKOFF_S = 300.0


class JobFailed(RuntimeError):
    """The job could not finish (restarts spent, too few resources, or a fault a restart cannot fix)."""


def log(line: str) -> None:
    print(f"[launch] {line}", flush=True)


def _requested_world(path: str | Path, overrides: list[str]) -> int | None:
    """nodes x workers_per_node of the YAML + overrides, or None (derive the world from the parallel sizes)."""
    try:
        raw = OmegaConf.merge(OmegaConf.load(path),
                              OmegaConf.from_dotlist([o for o in overrides if o.startswith("cluster.")]))
        nodes = int(OmegaConf.select(raw, "cluster.nodes", default=1))
        per_node = int(OmegaConf.select(raw, "cluster.workers_per_node", default=0))
    except Exception:  # noqa: BLE001 - malformed input: load_config reports it with the key path
        return None
    return nodes * per_node if per_node > 0 and nodes > 0 else None


def load_launch_config(path: str | Path, overrides: list[str]) -> TrainRunConfig:
    """The run config with the world size the cluster section asks for (nodes x workers_per_node when set).

    A relative ``run_dir`` is made absolute against the driver's directory, so every actor writes to the same
    place whatever its own working directory (under `ray job submit --working-dir`, that is Ray's per-job copy of
    the directory: give multi-node jobs an absolute run_dir on a shared file system)."""
    cfg = load_config(path, overrides, world_size=_requested_world(path, overrides))
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    return cfg


def group_spec(cfg: TrainRunConfig) -> GroupSpec:
    """Bundles of the job: GPU ones when asked for, or with accelerator=auto when the cluster has GPUs."""
    c = cfg.cluster
    gpu = c.accelerator == "gpu" or (c.accelerator == "auto" and cluster_gpus() > 0)
    return GroupSpec(nodes=c.nodes, ranks_per_node=ranks_per_node(cfg), cpus=c.cpus_per_worker, gpu=gpu)


def start_group(cfg: TrainRunConfig, spec: GroupSpec, attempt: int) -> WorkerGroup:
    """Place the ranks, start one actor per rank and join them in a process group (rank 0 is the master)."""
    from launch.worker import TrainWorker

    placement = place(spec, cfg.cluster.placement_timeout_s)
    group = WorkerGroup(TrainWorker, spec, placement, runtime_env=cfg.cluster.runtime_env or None, args=(cfg,))
    try:
        where = wait_all(group.call("address"))
        master_addr, master_port = where[0]["ip"], where[0]["port"]
        nodes = sorted({w["node_id"] for w in where})
        log(f"attempt {attempt}: {spec.world_size} ranks on {len(nodes)} node(s) "
            f"({'1 GPU' if spec.gpu else 'CPU only'} + {spec.cpus} CPU each); master {master_addr}:{master_port}")
        for w in where:
            log(f"  rank {w['rank']}: node {w['ip']} ({w['node_id'][:8]}) pid {w['pid']}"
                + (f" GPU {','.join(w['gpus'])}" if w["gpus"] else ""))
        wait_all(group.call("setup", spec.world_size, master_addr, master_port, where, attempt))
    except BaseException:
        group.kill()
        raise
    return group


def describe(err: BaseException) -> str:
    """One line saying what failed (which rank / node, and why)."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause
        return f"a rank raised {type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause) else ''}"
    if isinstance(err, ray.exceptions.RayActorError):
        return f"a rank's actor died ({str(err).strip().splitlines()[0][:300]})"
    return f"{type(err).__name__}: {err}"


def run_job(cfg: TrainRunConfig) -> dict[str, dict]:
    """Run ``cfg.pipeline`` on the connected Ray cluster with restarts; rank 0's report per stage."""
    c = cfg.cluster
    spec = group_spec(cfg)
    remaining, reports, restarts = list(cfg.pipeline), {}, 0
    while remaining:
        group = None
        try:
            group = start_group(cfg, spec, restarts)
            while remaining:
                stage = remaining[0]
                log(f"stage {stage}: running on {spec.world_size} ranks")
                reports[stage] = wait_all(group.call("run_stage", stage))[0] | {"restarts": restarts}
                remaining.pop(0)
            wait_all(group.call("shutdown"))
        except ResourceError as err:
            raise JobFailed(f"{'after ' + str(restarts) + ' restart(s), ' if restarts else ''}{err}") from None
        except ray.exceptions.RayError as err:
            if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, NonRetryableError):
                raise JobFailed(f"{describe(err)} (a restart cannot fix this)") from None
            if restarts >= c.max_restarts:
                raise JobFailed(f"{describe(err)}; cluster.max_restarts={c.max_restarts} restart(s) spent, "
                                "giving up (the checkpoints in the run dir are intact: resubmit to resume)") from None
            restarts += 1
            backoff = min(c.restart_backoff_s * 2 ** (restarts - 1), _MAX_BACKOFF_S)
            log(f"{describe(err)}. Restart {restarts}/{c.max_restarts}: group torn down, resuming stage "
                f"{remaining[0]} from its latest checkpoint in {backoff:g}s")
        finally:
            if group is not None:
                group.kill()
        if remaining:
            time.sleep(backoff)
    return reports


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    quiet_known_warnings()
    path = DEFAULT_CONFIG
    if argv and "=" not in argv[0]:
        path, argv = Path(argv[0]), argv[1:]
    try:
        cfg = load_launch_config(path, argv)
    except ValueError as err:
        print(f"launch: config error: {err}", file=sys.stderr)
        return 2
    c = cfg.cluster
    try:
        how = connect(c.address, num_cpus=c.num_cpus, include_dashboard=c.include_dashboard,
                      dashboard_host=c.dashboard_host)
        # `ray job stop` sends SIGTERM: clean up like Ctrl-C (set after ray.init, which installs its own handler).
        signal.signal(signal.SIGTERM, _raise_interrupt)
        log(f"{how} a Ray cluster ({ray.cluster_resources().get('CPU', 0):g} CPU, {cluster_gpus()} GPU); "
            f"run dir {Path(cfg.run_dir).resolve()}")
        reports = run_job(cfg)
        print(summary_table(cfg, reports), flush=True)
        return 0
    except JobFailed as err:
        print(f"launch: job failed: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("launch: stopped; every worker was killed (checkpoints in the run dir are kept)", file=sys.stderr,
              flush=True)
        return 130
    finally:
        ray.shutdown()
