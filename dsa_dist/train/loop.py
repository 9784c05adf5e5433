"""The training loop of one stage on Megatron-Core pieces, and the pipeline of stages (issue 5 §3-§5).

:class:`StageTrainer` trains one stage (DESIGN.md §1 "Losses"); :func:`run_pipeline` chains the configured stages.

One optimizer step::

    micro_batches = data.next_global_batch()          # this DP rank's share, gradient accumulation = len()
    forward_backward(forward_step, micro_batches)     # Megatron schedule; DDP reduces grads over DP x CP
    finalize_model_grads                              # (called by the schedule) + divide by the global token count
    optimizer_step: prepare -> grad norm -> clip -> Adam
    scheduler.step(1)

Loss (per-token normalisation, ``calculate_per_token_loss``): each micro-batch returns ``sum of masked LM losses
+ coeff * KL * local tokens`` and its token count; Megatron sums gradients over micro-batches and DP x CP ranks
and divides by the global token count, so both terms are exact global per-token means whatever the
accumulation and CP/DP layout. The indexer KL is a per-row mean, hence the scaling by the local token count.

Precision: the model runs in ``model.params_dtype`` (bf16 on GPU, with Megatron's fp32 master weights and fp32
gradient reduction; fp32 on CPU, where every step is bitwise reproducible and a resumed run repeats the
uninterrupted one exactly).
"""

from __future__ import annotations

import hashlib
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dsa_dist.compat import cuda_literals_to_cpu, default_device, manual_seed
from dsa_dist.config import TrainRunConfig, to_yaml
from dsa_dist.model.builder import build_model, get_indexer_loss_tracker
from dsa_dist.parallel import current_parallel_dims, init_parallel, zigzag_split
from dsa_dist.train import checkpoint as ckpt
from dsa_dist.train.data import DataStream, PackedWindows, eval_batches, open_corpus
from dsa_dist.train.evals import evaluate_task
from dsa_dist.train.metrics import MetricsLogger, flops_per_sequence, peak_memory_gb
from dsa_dist.train.optim import build_optimizer, group_lrs, optimizer_step
from dsa_dist.train.stages import is_indexer_param, resolve_stage, set_trainable


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["megatron"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron"])


def _fingerprint(micro_batches: list) -> str:
    """A short digest of this rank's sample ids and tokens of one step (to compare data order across runs)."""
    h = hashlib.blake2b(digest_size=8)
    for b in micro_batches:
        h.update(b.sample_ids.numpy().tobytes())
        h.update(b.tokens.numpy().tobytes())
    return h.hexdigest()


class StageTrainer:
    """Builds model, optimizer, data and checkpoints of one stage on this rank, and runs its steps."""

    def __init__(self, cfg: TrainRunConfig, stage: str, *, init_from: str | Path | None = None) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg, self.stage, self.plan = cfg, stage, resolve_stage(cfg, stage)
        self.spec = self.plan.spec
        self.dims = current_parallel_dims()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = default_device()
        self.stage_dir = Path(cfg.run_dir) / stage
        self.ckpt_root = self.stage_dir / "checkpoints"

        # Model: identical initial weights on every rank (TP shards are cut from one host-side master matrix).
        manual_seed(cfg.train.seed)
        self.gpt = build_model(self.plan.model, runtime=self.plan.runtime)
        self.tracker = get_indexer_loss_tracker(self.gpt)
        self._measure_recall = False  # this step's choice, passed to tracker.begin_forward by each forward
        self.n_trainable, _ = set_trainable(self.gpt, self.spec)
        config = self.gpt.config
        config.calculate_per_token_loss = True  # read by DDP (grad scaling) and the schedule
        config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   use_distributed_optimizer=cfg.parallel.distributed_optimizer)
        module = self.gpt
        if config.bf16:
            # Megatron's Float16Module casts every parameter to bf16 (its local norm modules are built in fp32,
            # which its mixed-precision optimizer cannot checkpoint), bf16 inputs in and fp32 outputs out.
            from megatron.core.transformer.module import Float16Module

            module = Float16Module(config, self.gpt)
        self.ddp = DistributedDataParallel(config, ddp_config, module)
        self.optimizer, self.scheduler = build_optimizer(
            self.ddp, self.plan, cfg.optim, bf16=self.plan.model.params_dtype == "bfloat16",
            distributed_optimizer=cfg.parallel.distributed_optimizer)
        self.forward_backward = get_forward_backward_func()

        # Data: the same stream on every TP/CP peer of a DP rank.
        prefix, self.tokenizer = open_corpus(cfg.data)
        self.windows = PackedWindows(prefix, self.plan.model.seq_len)
        self.data = DataStream(self.windows, self.tokenizer, seed=cfg.train.seed,
                               micro_batch_size=self.plan.micro_batch_size,
                               num_microbatches=self.plan.num_microbatches, dp_rank=self.dims.dp_rank,
                               dp_size=self.dims.dp, task_fraction=cfg.data.task_fraction,
                               tasks=tuple(cfg.data.tasks))
        self.step = 0
        self.start = self._restore(init_from)  # "resumed from X" / "initialised from X" / "fresh start"
        self._flops_per_seq = self._estimate_flops()

    # ------------------------------------------------------------------------------------------ checkpoint state
    def _layout(self) -> dict:
        d = self.dims
        return {"world_size": d.world_size, "tp": d.tp, "cp": d.cp, "pp": d.pp, "dp": d.dp}

    def _train_state(self) -> dict:
        return {"step": self.step, "stage": self.stage, "steps": self.plan.steps,
                "consumed_samples": self.data.consumed_samples, "layout": self._layout(),
                "seed": self.cfg.train.seed}

    def _sharded_state(self, *, is_loading: bool, with_optimizer: bool, with_rng: bool) -> dict:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        model_sd = self.gpt.sharded_state_dict()
        state: dict = {"model": model_sd}
        if with_optimizer:
            meta = {"distrib_optim_sharding_type": "fully_reshardable"} if self.cfg.parallel.distributed_optimizer \
                else None
            state["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=meta)
            state["scheduler"] = self.scheduler.state_dict()
            state["train"] = self._train_state()
        if with_rng:
            world = self.dims.world_size
            state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (self.rank,), replica_id=0)
        return state

    def save(self) -> Path:
        """Checkpoint model, optimizer, scheduler, step, data position and RNG (collective)."""
        with cuda_literals_to_cpu():
            state = self._sharded_state(is_loading=False, with_optimizer=True, with_rng=True)
            return ckpt.save_checkpoint(self.ckpt_root, self.step, state, self._train_state(),
                                        self.cfg.checkpoint.keep_last)

    def _restore(self, init_from: str | Path | None) -> str:
        """Resume from this stage's latest checkpoint, else start from ``init_from``'s weights, else fresh."""
        latest = ckpt.latest_checkpoint(self.ckpt_root) if self.cfg.checkpoint.resume else None
        if latest is not None:
            saved = ckpt.read_train_state(latest)
            same_layout = saved["layout"] == self._layout()
            with cuda_literals_to_cpu():
                state = ckpt.load_checkpoint(latest, self._sharded_state(is_loading=True, with_optimizer=True,
                                                                          with_rng=same_layout))
            self.gpt.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["train"]["step"])
            self.data.load_state_dict(state["train"])
            if same_layout:
                _set_rng_state(state["rng"])
            else:  # per-rank RNG streams do not map onto another layout: derive fresh ones deterministically
                manual_seed(self.cfg.train.seed + 1_000_003 * self.step + self.rank)
            return f"resumed from {latest}"
        if init_from is not None:
            saved = ckpt.read_train_state(init_from)
            with cuda_literals_to_cpu():
                state = ckpt.load_checkpoint(init_from, self._sharded_state(is_loading=True, with_optimizer=False,
                                                                             with_rng=False))
            self.gpt.load_state_dict(state["model"])
            self.optimizer.reload_model_params()  # refresh fp32 master weights from the loaded bf16 ones
            # The new stage continues the data stream where the previous one stopped.
            self.data.load_state_dict(saved)
            return f"initialised from {init_from} (weights only, new optimizer)"
        return "fresh start"

    # ------------------------------------------------------------------------------------------ one step
    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        """Full-sequence ``[b, L]`` -> this CP rank's zigzag shard ``[b, L/cp]``."""
        return zigzag_split(x, 1, self.dims.cp, self.dims.cp_rank)

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens, labels, mask = (self._shard(t).to(self.device, non_blocking=True)
                                for t in (batch.tokens, batch.labels, batch.loss_mask))
        self.tracker.begin_forward(measure_recall=self._measure_recall)
        per_token_loss = model(tokens, None, None, labels=labels)  # [b, s_local] fp32 (vocab-parallel CE)
        return per_token_loss, partial(self._loss_func, mask)

    def _loss_func(self, mask: torch.Tensor, per_token_loss: torch.Tensor):
        n_tokens = mask.sum()
        lm_sum = (per_token_loss.float() * mask).sum()
        kl = self.tracker.total().to(lm_sum.device) if self.tracker.layers else torch.zeros((), device=lm_sum.device)
        coeff = self.plan.model.indexer_loss_coeff
        loss = torch.zeros((), device=lm_sum.device)
        if self.spec.lm_loss:
            loss = loss + lm_sum
        if self.spec.indexer_loss:
            loss = loss + coeff * kl * n_tokens  # KL is a mean over rows: scale to this micro-batch's tokens
        recall = self.tracker.recall()
        report = torch.stack([lm_sum.detach(), n_tokens.detach().float(), kl.detach().float(),
                              torch.tensor(float(np.mean(list(recall.values()))) if recall else float("nan"),
                                           device=lm_sum.device)])
        return loss, n_tokens.detach().int(), {"report": report}

    def train_step(self, measure_recall: bool = False) -> dict:
        """One optimizer step over a global batch; returns the step's globally reduced metrics."""
        micro_batches = self.data.next_global_batch()
        self._measure_recall = measure_recall
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        with cuda_literals_to_cpu():
            reports = self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=iter(micro_batches), model=[self.ddp],
                num_microbatches=len(micro_batches), seq_length=self.plan.model.seq_len // self.dims.cp,
                micro_batch_size=self.plan.micro_batch_size, forward_only=False)
        updated, grad_norm = optimizer_step(self.optimizer, self.cfg.optim.clip_grad)
        self.scheduler.step(1)
        self.step += 1

        lm_loss, kl, recall = self._reduce_reports(reports)
        lr, indexer_lr = group_lrs(self.optimizer)
        coeff = self.plan.model.indexer_loss_coeff
        loss = (lm_loss if self.spec.lm_loss else 0.0) + (coeff * kl if self.spec.indexer_loss else 0.0)
        return {"step": self.step, "loss": loss, "lm_loss": lm_loss, "indexer_kl": kl,
                "indexer_recall": recall, "grad_norm": grad_norm,
                "lr": lr, "indexer_lr": indexer_lr, "updated": updated, "data": _fingerprint(micro_batches)}

    def _reduce_reports(self, reports: list[dict]) -> tuple[float, float, float | None]:
        """(LM loss, indexer KL, recall or None) of a step, reduced over micro-batches and all ranks.

        [lm_sum, tokens] are duplicated on TP peers (their ratio is unaffected); KL and recall are per-rank means
        over equally sized row sets, so their average over all ranks is the global mean.
        """
        r = torch.stack([x["report"] for x in reports]).to(torch.float64)  # [micro, 4]
        has_recall = not torch.isnan(r[:, 3]).any()
        vec = torch.stack([r[:, 0].sum(), r[:, 1].sum(), r[:, 2].mean(),
                           r[:, 3].mean() if has_recall else torch.zeros((), dtype=torch.float64, device=r.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
            vec[2:] /= dist.get_world_size()
        return float(vec[0] / vec[1]), float(vec[2]), float(vec[3]) if has_recall else None

    @torch.no_grad()
    def eval_loss(self, batches: list) -> dict[str, float]:
        """LM loss and indexer KL on fixed full-sequence batches, forward only (parameters untouched)."""
        self._measure_recall = False
        with cuda_literals_to_cpu():
            reports = self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.ddp],
                num_microbatches=len(batches), seq_length=self.plan.model.seq_len // self.dims.cp,
                micro_batch_size=batches[0].tokens.shape[0], forward_only=True)
        lm_loss, kl, _ = self._reduce_reports(reports)
        return {"lm_loss": lm_loss, "indexer_kl": kl}

    # ------------------------------------------------------------------------------------------ evals, flops
    def evaluate(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for task in self.cfg.data.eval_tasks:
            batches = eval_batches(self.windows, self.tokenizer, task, self.cfg.data.eval_samples,
                                   self.plan.micro_batch_size, self.cfg.train.seed)
            with cuda_literals_to_cpu():
                res = evaluate_task(self.gpt, batches, shard=self._shard, device=self.device)
            out[f"eval/{task}_acc"] = res["acc"]
            out[f"eval/{task}_answer_loss"] = res["answer_loss"]
        return out

    def _estimate_flops(self) -> float:
        tp = self.dims.tp
        n_mat = n_idx = 0
        for name, p in self.gpt.named_parameters():
            if p.dim() < 2 or "embedding" in name:
                continue
            n = p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
            n_mat += n
            n_idx += n if is_indexer_param(name) else 0
        return flops_per_sequence(self.plan.model, n_mat, n_idx, seq_len=self.plan.model.seq_len,
                                  sparse=self.plan.runtime.attention == "sparse",
                                  train_main=self.spec.trains != "indexer", train_indexer=self.spec.trains != "main")

    # ------------------------------------------------------------------------------------------ the stage
    def run(self, until: int | None = None) -> list[dict]:
        """Train until ``plan.steps`` (or stop early at step ``until``, with a checkpoint), logging, evaluating
        and checkpointing; returns the per-step records."""
        cfg, plan = self.cfg, self.plan
        history: list[dict] = []
        if self.step >= plan.steps:
            return history
        log = MetricsLogger(self.stage_dir, self.stage, plan.steps, self.step, enabled=self.rank == 0,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
        log.print(f"[{self.stage}] {self.start}: step {self.step}/{plan.steps}, {self.n_trainable:,} trainable params, "
                  f"global batch {plan.global_batch_size} x {plan.model.seq_len} tokens, "
                  f"{plan.num_microbatches} micro-batch(es) per step, layout {self._layout()}")
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
                if log_now:
                    seqs = plan.global_batch_size * steps_timed
                    perf = {"tokens_per_s": seqs * plan.model.seq_len / train_time,
                            "tflops": self._flops_per_seq * seqs / train_time / self.dims.world_size / 1e12,
                            "peak_memory_gb": peak_memory_gb()}
                    train_time, steps_timed = 0.0, 0
                    keys = ("loss", "lm_loss", "indexer_kl", "indexer_recall", "lr", "indexer_lr", "grad_norm")
                    log.log(self.step, {k: rec[k] for k in keys if rec[k] is not None} | perf)
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


def run_pipeline(cfg: TrainRunConfig) -> dict[str, list[dict]]:
    """Run every stage of ``cfg.pipeline`` on this process (torch.distributed set up here); per-stage history.

    Stages chain through checkpoints: each starts from the previous stage's final checkpoint (the first from
    ``checkpoint.init_from``); a stage whose latest checkpoint is at its final step is skipped.
    """
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    init_parallel(cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.pp)
    rank = dist.get_rank()
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    history: dict[str, list[dict]] = {}
    init_from = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else None
    for stage in cfg.pipeline:
        stage_ckpts = run_dir / stage / "checkpoints"
        latest = ckpt.latest_checkpoint(stage_ckpts) if cfg.checkpoint.resume else None
        steps = resolve_stage(cfg, stage).steps
        if latest is not None and ckpt.read_train_state(latest)["step"] >= steps:
            if rank == 0:
                print(f"[{stage}] already complete ({latest}), skipping", flush=True)
            history[stage] = []
        else:
            if stage != "dense" and init_from is None and latest is None and rank == 0:
                print(f"[{stage}] warning: no previous stage and no checkpoint.init_from: starting from random "
                      "weights (the recipe expects a dense model)", flush=True)
            if stage == "grpo":
                from dsa_dist.rl.trainer import GRPOTrainer

                trainer = GRPOTrainer(cfg, stage, init_from=init_from)
            else:
                trainer = StageTrainer(cfg, stage, init_from=init_from)
            history[stage] = trainer.run()
            del trainer
        # The next stage starts from this stage's final checkpoint.
        init_from = ckpt.latest_checkpoint(stage_ckpts)
    if rank == 0:
        print(f"done: {', '.join(cfg.pipeline)} -> {run_dir}", flush=True)
    return history
