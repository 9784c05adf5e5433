"""The loop of one stage, assembled from the trainer parts (docs/training.md).

:class:`StageTrainer` owns nothing but the cadence: it builds the parts —
:func:`~dsa_dist.train.setup.build_model_and_optimizer` (model, DDP, optimizer, scheduler),
:class:`~dsa_dist.train.data.DataStream`, :class:`~dsa_dist.train.step.StepFunction` (forward step, loss,
reduction, non-finite guard), :class:`~dsa_dist.train.checkpoint_manager.CheckpointManager`,
:class:`~dsa_dist.train.evaluator.Evaluator` and :class:`~dsa_dist.train.metrics.MetricsLogger` — and runs::

    for each step until plan.steps (or ``until``):
        record = step_fn.train_step(data.next_global_batch())    # skipped (and counted) when non-finite
        log every logging.log_interval; evaluate every train.eval_interval and at the end
        save every checkpoint.interval, at ``until`` and at the end

Resume (docs/fault_tolerance.md): the stage continues from its newest *verified* checkpoint. The schedule of
the current config applies from the restored step (a changed ``lr``/``min_lr``/``steps``/``warmup_steps`` is
reported, then used; extending a finished stage continues the new schedule, not ``min_lr``). The checkpoint
records which checkpoint the stage was initialised from (its lineage); resuming it from another one is refused.

Precision: the model runs in ``model.params_dtype`` (bf16 on GPU, with Megatron's fp32 master weights and fp32
gradient reduction; fp32 on CPU, where every step is bitwise reproducible and a resumed run repeats the
uninterrupted one exactly).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from dsa_dist.compat import default_device
from dsa_dist.config import TrainRunConfig
from dsa_dist.parallel import current_parallel_dims
from dsa_dist.train import checkpoint as ckpt
from dsa_dist.train.checkpoint_manager import CheckpointManager, check_lineage, lineage_of, verified
from dsa_dist.train.cpu_scope import in_megatron_cpu_scope
from dsa_dist.train.data import DataStream, PackedWindows, open_corpus
from dsa_dist.train.evaluator import Evaluator
from dsa_dist.train.heartbeat import Heartbeat
from dsa_dist.train.metrics import MetricsLogger, peak_memory_gb
from dsa_dist.train.setup import build_model_and_optimizer, estimate_flops_per_sequence
from dsa_dist.train.stages import StagePlan, resolve_stage
from dsa_dist.train.step import StepFunction

SCHEDULE_KEYS = ("steps", "lr", "min_lr", "indexer_lr", "indexer_min_lr", "warmup_steps", "decay_style")
LOG_KEYS = ("loss", "lm_loss", "indexer_kl", "indexer_recall", "lr", "indexer_lr", "grad_norm")


def stage_schedule(cfg: TrainRunConfig, plan: StagePlan) -> dict:
    """The LR schedule of a stage as recorded in its checkpoints."""
    return {"steps": plan.steps, "lr": plan.lr, "min_lr": plan.min_lr, "indexer_lr": plan.indexer_lr,
            "indexer_min_lr": plan.indexer_min_lr, "warmup_steps": plan.warmup_steps,
            "decay_style": cfg.optim.decay_style}


class StageTrainer:
    """Trains one stage on this rank: the parts, the resume logic and the loop (see the module docstring)."""

    @in_megatron_cpu_scope
    def __init__(self, cfg: TrainRunConfig, stage: str, *, init_from: str | Path | None = None,
                 heartbeat: Heartbeat | None = None) -> None:
        self.cfg, self.stage, self.plan = cfg, stage, resolve_stage(cfg, stage)
        self.spec = self.plan.spec
        self.dims = current_parallel_dims()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = default_device()
        self.stage_dir = Path(cfg.run_dir) / stage
        self.heartbeat = heartbeat

        self.parts = build_model_and_optimizer(cfg, self.plan)
        self.gpt = self.parts.gpt
        # Data: the same stream on every TP/CP peer of a DP rank.
        prefix, self.tokenizer = open_corpus(cfg.data)
        self.windows = PackedWindows(prefix, self.plan.model.seq_len)
        self.data = DataStream(self.windows, self.tokenizer, seed=cfg.train.seed,
                               micro_batch_size=self.plan.micro_batch_size,
                               num_microbatches=self.plan.num_microbatches, dp_rank=self.dims.dp_rank,
                               dp_size=self.dims.dp, task_fraction=cfg.data.task_fraction,
                               tasks=tuple(cfg.data.tasks))
        self.step_fn = StepFunction(self.parts, self.plan, self.dims, self.device, clip_grad=cfg.optim.clip_grad,
                                    max_nonfinite_steps=cfg.train.max_nonfinite_steps)
        self.evaluator = Evaluator(cfg, self.step_fn, self.windows, self.tokenizer)
        self.checkpoints = CheckpointManager(self.stage_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                             distributed_optimizer=cfg.parallel.distributed_optimizer)
        self.step = 0
        self.lineage: dict | None = None
        self.notes: list[str] = []
        self.start = self._restore(init_from)  # "resumed from X" / "initialised from X" / "fresh start"
        self._flops_per_seq = estimate_flops_per_sequence(self.gpt, self.plan, self.dims.tp)

    # ------------------------------------------------------------------------------------------ checkpoints
    def layout(self) -> dict:
        d = self.dims
        return {"world_size": d.world_size, "tp": d.tp, "cp": d.cp, "pp": d.pp, "dp": d.dp}

    def train_state(self) -> dict:
        """The JSON record saved with each checkpoint (also read by the pipeline and by humans)."""
        return {"step": self.step, "stage": self.stage, "steps": self.plan.steps,
                "consumed_samples": self.data.consumed_samples, "layout": self.layout(), "seed": self.cfg.train.seed,
                "schedule": stage_schedule(self.cfg, self.plan), "lineage": self.lineage,
                "skipped_steps": self.step_fn.skipped_steps}

    def save(self) -> Path:
        """Checkpoint model, optimizer, scheduler, step, data position and RNG (collective)."""
        return self.checkpoints.save(self.parts, self.step, self.train_state())

    def _restore(self, init_from: str | Path | None) -> str:
        """Resume from this stage's newest good checkpoint, else start from ``init_from``'s weights, else fresh."""
        init_state = verified(init_from) if init_from is not None else None
        latest = self.checkpoints.latest_good() if self.cfg.checkpoint.resume else None
        if latest is not None:
            saved = ckpt.read_train_state(latest)
            if init_state is not None:
                check_lineage(self.stage, latest, saved.get("lineage"), lineage_of(init_from, init_state))
            self.checkpoints.restore(self.parts, latest, full=True, layout=self.layout(), seed=self.cfg.train.seed)
            self.step = int(saved["step"])
            self.data.load_state_dict(saved)
            self.lineage = saved.get("lineage")
            self.step_fn.skipped_steps = int(saved.get("skipped_steps", 0))
            old, new = saved.get("schedule") or {}, stage_schedule(self.cfg, self.plan)
            changed = {k: (old[k], new[k]) for k in SCHEDULE_KEYS if k in old and old[k] != new[k]}
            if changed:
                diff = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                self.notes.append(f"the LR schedule changed since {latest.name} ({diff}): the current config's "
                                  f"schedule applies from step {self.step}")
            return f"resumed from {latest}"
        if init_from is not None:
            saved = self.checkpoints.restore(self.parts, init_from, full=False, layout=self.layout(),
                                             seed=self.cfg.train.seed)
            self.lineage = lineage_of(init_from, init_state)
            self.data.load_state_dict(saved)  # the new stage continues the data stream where the last one stopped
            return f"initialised from {init_from} (weights only, new optimizer)"
        return "fresh start"

    # ------------------------------------------------------------------------------------------ steps, evals
    def train_step(self, measure_recall: bool = False) -> dict:
        """One optimizer step over the next global batch; returns its record (see StepFunction.train_step)."""
        rec = self.step_fn.train_step(self.data.next_global_batch(), measure_recall=measure_recall)
        self.step += 1
        if self.heartbeat is not None:
            self.heartbeat.step = self.step
        return {"step": self.step, **rec}

    def eval_loss(self, batches: list) -> dict[str, float]:
        """LM loss and indexer KL on fixed full-sequence batches, forward only (parameters untouched)."""
        return self.evaluator.loss(batches)

    def evaluate(self) -> dict[str, float]:
        """The task evals of ``data.eval_tasks``."""
        return self.evaluator.tasks()

    # ------------------------------------------------------------------------------------------ the stage
    @in_megatron_cpu_scope
    def run(self, until: int | None = None) -> list[dict]:
        """Train until ``plan.steps`` (or stop early at step ``until``, with a checkpoint), logging, evaluating
        and checkpointing; returns the per-step records."""
        cfg, plan = self.cfg, self.plan
        history: list[dict] = []
        if self.step >= plan.steps:
            return history
        log = MetricsLogger(self.stage_dir, self.stage, plan.steps, self.step, enabled=self.rank == 0,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
        log.print(f"[{self.stage}] {self.start}: step {self.step}/{plan.steps}, {self.parts.n_trainable:,} trainable "
                  f"params, global batch {plan.global_batch_size} x {plan.model.seq_len} tokens, "
                  f"{plan.num_microbatches} micro-batch(es) per step, layout {self.layout()}")
        for note in self.notes:
            log.print(f"[{self.stage}] {note}")
        train_time, steps_timed = 0.0, 0
        try:
            stop = plan.steps if until is None else min(until, plan.steps)
            while self.step < stop:
                log_now = (self.step + 1) % cfg.logging.log_interval == 0 or self.step + 1 == plan.steps
                t0 = time.perf_counter()
                rec = self.train_step(measure_recall=log_now and cfg.logging.recall)
                train_time += time.perf_counter() - t0
                steps_timed += 1
                history.append(rec)
                log.advance(self.step)
                if rec["skipped"]:
                    log.print(f"[{self.stage}] step {self.step} skipped: non-finite loss {rec['loss']:.4g} or grad "
                              f"norm {rec['grad_norm']:.4g} ({self.step_fn.nonfinite_in_row} in a row, "
                              f"{self.step_fn.skipped_steps} in this stage)")
                    log.log(self.step, {"skipped_steps": self.step_fn.skipped_steps}, quiet=True)
                self.step_fn.check_divergence(self.step)
                if log_now:
                    seqs = plan.global_batch_size * steps_timed
                    perf = {"tokens_per_s": seqs * plan.model.seq_len / train_time,
                            "tflops": self._flops_per_seq * seqs / train_time / self.dims.world_size / 1e12,
                            "peak_memory_gb": peak_memory_gb(), "skipped_steps": self.step_fn.skipped_steps}
                    train_time, steps_timed = 0.0, 0
                    log.log(self.step, {k: rec[k] for k in LOG_KEYS if rec[k] is not None} | perf)
                last = self.step == plan.steps
                if cfg.data.eval_tasks and (last or (cfg.train.eval_interval
                                                     and self.step % cfg.train.eval_interval == 0)):
                    log.log(self.step, self.evaluate(), prefix="eval ")
                if last or self.step == stop or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                    path = self.save()
                    log.print(f"[{self.stage}] saved {path}")
        finally:
            log.close()
        return history
