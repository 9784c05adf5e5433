"""The stage pipeline of a run on this process: ``run_pipeline(cfg)`` and ``run_stage(cfg, stage, init_from)``.

:func:`run_pipeline` is what ``dsa-train`` runs on every rank: it joins the process group (collective timeout
``parallel.timeout_s``), takes the run-directory lock (rank 0), refuses or moves aside an old run when
``checkpoint.resume=false``, starts the per-rank heartbeat and the child-process guard, and runs the stages of
``cfg.pipeline`` in order. Stages chain through checkpoints: each starts from the previous stage's newest
verified checkpoint (the first from ``checkpoint.init_from``); a stage whose newest checkpoint is at its final
step is skipped (after checking it descends from the checkpoint the pipeline would start it from). When a
collective times out, the error names the rank(s) whose heartbeat stopped (docs/fault_tolerance.md).

:func:`run_stage` trains one stage in an initialised process group (e.g. in a Ray worker that manages the group
and the run directory itself); it is the one place a stage run enters
:func:`~dsa_dist.train.cpu_scope.megatron_cpu_scope`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from dsa_dist.config import TrainRunConfig, to_yaml
from dsa_dist.parallel import init_parallel
from dsa_dist.train import checkpoint as ckpt
from dsa_dist.train.checkpoint_manager import CheckpointManager, check_lineage, lineage_of, verified
from dsa_dist.train.cpu_scope import megatron_cpu_scope
from dsa_dist.train.errors import RunDirError, StuckRankError
from dsa_dist.train.heartbeat import Heartbeat, describe_stale, stale_ranks
from dsa_dist.train.procguard import guard_child_processes
from dsa_dist.train.run_dir import RunDirLock, check_fresh_start
from dsa_dist.train.stages import resolve_stage
from dsa_dist.train.trainer import StageTrainer

HEARTBEAT_S = 1.0


def stage_trainer(cfg: TrainRunConfig, stage: str, init_from: str | Path | None = None, *,
                  heartbeat: Heartbeat | None = None):
    """The trainer of ``stage``: :class:`dsa_dist.rl.trainer.GRPOTrainer` for ``grpo``, else
    :class:`StageTrainer` (it restores on construction; ``.start`` says how). Call inside
    :func:`~dsa_dist.train.cpu_scope.megatron_cpu_scope`."""
    if stage == "grpo":
        from dsa_dist.rl.trainer import GRPOTrainer

        return GRPOTrainer(cfg, stage, init_from=init_from, heartbeat=heartbeat)
    return StageTrainer(cfg, stage, init_from=init_from, heartbeat=heartbeat)


def run_stage(cfg: TrainRunConfig, stage: str, init_from: str | Path | None = None, *,
              heartbeat: Heartbeat | None = None) -> list[dict]:
    """Train ``stage`` (resuming from its newest good checkpoint, else from ``init_from``'s weights); history.

    Needs an initialised process group and Megatron parallel state (:func:`dsa_dist.parallel.init_parallel`).
    """
    with megatron_cpu_scope():
        return stage_trainer(cfg, stage, init_from, heartbeat=heartbeat).run()


def _from_rank0(value: object) -> object:
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _prepare_run_dir(cfg: TrainRunConfig) -> tuple[RunDirLock | None, list[str]]:
    """Rank 0: lock the run dir, apply ``checkpoint.on_existing``, write config.yaml. Errors reach every rank."""
    run_dir = Path(cfg.run_dir)
    lock, lines, error = None, [], None
    if dist.get_rank() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunDirLock(run_dir).acquire()
            prev = lock.previous_holder
            if prev:
                lines.append(f"took over the lock of {run_dir} from pid {prev.get('pid')} on host {prev.get('host')} "
                             "(that run is gone)")
            if not cfg.checkpoint.resume:
                lines += check_fresh_start(run_dir, list(cfg.pipeline), cfg.checkpoint.on_existing)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        except RunDirError as err:
            error = str(err)
        except OSError as err:
            error = f"run_dir {run_dir} is not usable ({err.strerror}: {err.filename}); choose a writable run_dir"
        if error and lock is not None:
            lock.release()
    error = _from_rank0(error)
    if error:
        raise RunDirError(error)
    return lock, lines


def run_pipeline(cfg: TrainRunConfig) -> dict[str, list[dict]]:
    """Run every stage of ``cfg.pipeline`` on this process (torch.distributed set up here); per-stage history."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    init_parallel(cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.pp, timeout_s=cfg.parallel.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.run_dir)
    guard_child_processes()
    lock, lines = _prepare_run_dir(cfg)
    for line in lines if rank == 0 else ():
        print(line, flush=True)
    heartbeat = Heartbeat(run_dir, rank, HEARTBEAT_S) if world > 1 else None
    try:
        history = _run_stages(cfg, rank, heartbeat)
    except Exception as err:
        stale = stale_ranks(run_dir, world, max_age=3 * HEARTBEAT_S) if world > 1 else []
        if stale:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise StuckRankError(
                f"rank {rank}: a collective did not complete (parallel.timeout_s={cfg.parallel.timeout_s:g}): "
                f"{describe_stale(stale)} stopped responding; stopping the run. Resume restarts from the last "
                f"checkpoint. ({type(err).__name__}: {reason})") from err
        raise
    finally:
        if heartbeat is not None:
            heartbeat.close()
        if lock is not None:
            lock.release()
    if rank == 0:
        print(f"done: {', '.join(cfg.pipeline)} -> {run_dir}", flush=True)
    return history


def _run_stages(cfg: TrainRunConfig, rank: int, heartbeat: Heartbeat | None) -> dict[str, list[dict]]:
    run_dir = Path(cfg.run_dir)
    history: dict[str, list[dict]] = {}
    init_from = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else None
    for stage in cfg.pipeline:
        manager = CheckpointManager(run_dir / stage / "checkpoints", keep_last=cfg.checkpoint.keep_last)
        latest = manager.latest_good() if cfg.checkpoint.resume else None
        saved = ckpt.read_train_state(latest) if latest is not None else None
        if saved is not None and saved["step"] >= resolve_stage(cfg, stage).steps:
            if init_from is not None:
                check_lineage(stage, latest, saved.get("lineage"), lineage_of(init_from, verified(init_from)))
            if rank == 0:
                print(f"[{stage}] already complete ({latest}), skipping", flush=True)
            history[stage] = []
        else:
            if stage != "dense" and init_from is None and latest is None and rank == 0:
                print(f"[{stage}] warning: no previous stage and no checkpoint.init_from: starting from random "
                      "weights (the recipe expects a dense model)", flush=True)
            history[stage] = run_stage(cfg, stage, init_from, heartbeat=heartbeat)
        # The next stage starts from this stage's newest good checkpoint.
        init_from = manager.latest_good()
    return history
