"""The Ray actor of one rank: a few coarse methods over the training code (docs/ray.md).

``address`` (where the actor runs; rank 0 also picks the rendezvous port) -> ``setup`` (rank environment, NCCL
variables, torch.distributed + Megatron parallel state) -> ``run_stage`` once per stage -> ``shutdown``.
The driver (``launch/driver.py``) calls each method on every rank at once; collectives happen inside them.

Everything this module takes from the training code is imported in the block below, so the trainer's API can
move without touching the launch machinery.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import ray
import torch

from dsa_dist.train.cli import quiet_known_warnings

quiet_known_warnings()  # before Megatron is imported below: its import-time warnings repeat on every rank

from dsa_dist.config import TrainRunConfig, to_yaml  # noqa: E402
from dsa_dist.parallel import destroy_parallel, init_parallel  # noqa: E402
from dsa_dist.train.checkpoint import CheckpointError  # noqa: E402
from dsa_dist.train.checkpoint_manager import CheckpointManager  # noqa: E402
from dsa_dist.train.cpu_scope import megatron_cpu_scope  # noqa: E402
from dsa_dist.train.errors import TrainingError  # noqa: E402
from dsa_dist.train.pipeline import stage_trainer  # noqa: E402
from launch.cluster import NonRetryableError, free_port, node_address  # noqa: E402

# Errors that a restart cannot fix (a bad config or checkpoint): the driver fails the job instead of retrying.
_FATAL = (ValueError, TypeError, KeyError, ImportError, CheckpointError, TrainingError)


class TrainWorker:
    """One rank of the training job, hosted in a Ray actor."""

    def __init__(self, rank: int, cfg: TrainRunConfig) -> None:
        self.rank, self.cfg = rank, cfg

    def __repr__(self) -> str:
        # Ray prefixes this actor's stdout/stderr lines in the job log with its repr: "(rank3 pid=..., ip=...)".
        return f"rank{self.rank}"

    def address(self) -> dict:
        """Where this actor runs; rank 0 also reserves the rendezvous port (MASTER_PORT)."""
        ip, node_id, pid = node_address()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        return {"rank": self.rank, "ip": ip, "node_id": node_id, "pid": pid, "gpus": gpus,
                "port": free_port() if self.rank == 0 else None}

    def setup(self, world_size: int, master_addr: str, master_port: int, group: list[dict], attempt: int) -> None:
        """Rank environment + NCCL variables, then the process group and Megatron's TP/CP/PP/DP groups."""
        c, p = self.cfg.cluster, self.cfg.parallel
        per_node = world_size // c.nodes
        # Ray restricts CUDA_VISIBLE_DEVICES to this actor's GPU, so it is device 0 of the process.
        local_rank = 0 if torch.cuda.is_available() else self.rank % per_node
        os.environ.update(c.nccl_env)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        try:
            init_parallel(p.tp, p.cp, p.pp, timeout_s=p.timeout_s)
        except ValueError as err:
            raise NonRetryableError(str(err)) from err
        # One line per rank (Ray tags it with the actor's repr), so the job log shows every rank joined.
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        print(f"[launch] rank {self.rank}/{world_size} joined (attempt {attempt}, {device})", flush=True)
        if self.rank == 0:
            run_dir = Path(self.cfg.run_dir)
            (run_dir / "launch").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(_redacted(self.cfg)))
            # Which rank ran where in this attempt (tests and operators find a rank's PID and node here).
            (run_dir / "launch" / f"attempt_{attempt}.json").write_text(json.dumps(group, indent=1))

    def run_stage(self, stage: str) -> dict:
        """Train ``stage`` to its last step (resuming from its latest complete checkpoint); rank 0 returns the
        stage's merged per-step metrics (metrics.jsonl) and how it started."""
        run_dir = Path(self.cfg.run_dir)
        index = self.cfg.pipeline.index(stage)
        if index == 0:
            init_from = self.cfg.checkpoint.init_from
        else:  # a stage starts from the previous stage's newest verified checkpoint
            previous = run_dir / self.cfg.pipeline[index - 1] / "checkpoints"
            init_from = CheckpointManager(previous, keep_last=self.cfg.checkpoint.keep_last).latest_good()
        try:
            with megatron_cpu_scope():
                trainer = stage_trainer(self.cfg, stage, init_from)
                start = trainer.start
                history = trainer.run()
        except _FATAL as err:
            raise NonRetryableError(f"{type(err).__name__}: {err}") from err
        del trainer
        if self.rank != 0:
            return {}
        return {"stage": stage, "start": start, "steps_run": len(history),
                "records": _read_metrics(run_dir / stage / "metrics.jsonl")}

    def shutdown(self) -> None:
        """Destroy Megatron's groups and the process group (the actor is killed afterwards)."""
        destroy_parallel()


def _redacted(cfg: TrainRunConfig) -> TrainRunConfig:
    """``cfg`` with the runtime_env values hidden: they may carry secrets (tokens, keys)."""
    env = cfg.cluster.runtime_env
    hidden = {k: ({n: "<hidden>" for n in v} if isinstance(v, dict) else "<hidden>") for k, v in env.items()}
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, runtime_env=hidden))


def _read_metrics(path: Path) -> list[dict]:
    """One merged record per step of a stage's metrics.jsonl; a step logged again after a restart keeps the
    newest values (training and eval lines of a step are merged)."""
    merged: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                merged.setdefault(rec["step"], {}).update(rec)
    return [merged[s] for s in sorted(merged)]
