"""Model + optimizer of one stage on Megatron-Core pieces, for any trainer (SFT stages, GRPO, Ray workers).

:func:`build_model_and_optimizer` returns a :class:`ModelAndOptimizer`: the GPTModel with DSA attention, its
DDP wrapper (Megatron ``DistributedDataParallel``, per-token loss normalisation), the Megatron optimizer with the
main-model and indexer LR groups and its ``OptimizerParamScheduler``. Which parameters train follows the stage
(:func:`dsa_dist.train.stages.set_trainable`); indexer parameters are found by module type
(:func:`dsa_dist.train.stages.indexer_parameters`), never by name.

A trainer whose stage differs from the pre-training ones in what the model computes or how often the optimizer
steps passes that explicitly: the GRPO trainer (dsa_dist/rl/trainer.py) runs the DSA layers with its own
``runtime`` (indexer KL only while the indexers train), freezes the indexers when their loss coefficient is 0,
and takes ``updates_per_step`` optimizer steps per stage step (its LR schedule spans steps x updates).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from dsa_dist.compat import manual_seed
from dsa_dist.config import TrainRunConfig
from dsa_dist.model.builder import build_model, get_indexer_loss_tracker
from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.model.runtime import DSARuntime
from dsa_dist.train.cpu_scope import in_megatron_cpu_scope
from dsa_dist.train.metrics import flops_per_sequence
from dsa_dist.train.optim import build_optimizer
from dsa_dist.train.stages import StagePlan, indexer_parameters, set_trainable


@dataclass
class ModelAndOptimizer:
    """The trainable state of one stage on this rank."""

    gpt: torch.nn.Module
    """The unwrapped GPTModel (sharded_state_dict, evals, parameter inspection)."""
    ddp: torch.nn.Module
    """Megatron DDP wrapper (around Float16Module for bf16): what the forward/backward schedule runs."""
    optimizer: Any
    """Megatron optimizer (AdamW; fp32 master weights for bf16)."""
    scheduler: Any
    """Megatron ``OptimizerParamScheduler`` (warmup + decay, one schedule per LR group)."""
    tracker: IndexerLossTracker
    """Where the DSA layers record the indexer KL / recall of each forward."""
    n_trainable: int
    """Number of trainable parameters on this rank."""


@in_megatron_cpu_scope
def build_model_and_optimizer(cfg: TrainRunConfig, plan: StagePlan, *, runtime: DSARuntime | None = None,
                              freeze_indexers: bool = False, updates_per_step: int = 1) -> ModelAndOptimizer:
    """Build model, DDP and optimizer for ``plan`` (parallel state initialised; identical init on every rank).

    Args:
        cfg: the validated run config.
        plan: the stage (model, trainable parameters, LR schedule).
        runtime: what the DSA layers compute (default: the stage's ``plan.runtime``).
        freeze_indexers: keep the indexer parameters fixed although the stage trains them.
        updates_per_step: optimizer steps per stage step; the LR schedule (steps and warm-up) spans
            ``plan.steps * updates_per_step`` optimizer steps.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    # Identical initial weights on every rank (TP shards are cut from one host-side master matrix).
    manual_seed(cfg.train.seed)
    if updates_per_step < 1:
        raise ValueError(f"updates_per_step must be >= 1, got {updates_per_step}")
    gpt = build_model(plan.model, runtime=plan.runtime if runtime is None else runtime)
    tracker = get_indexer_loss_tracker(gpt)
    n_trainable, _ = set_trainable(gpt, plan.spec)
    if freeze_indexers:
        for p in indexer_parameters(gpt):
            if p.requires_grad:
                p.requires_grad_(False)
                n_trainable -= p.numel()
    config = gpt.config
    config.calculate_per_token_loss = True  # read by DDP (grad scaling) and the schedule
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    module = gpt
    if config.bf16:
        # Megatron's Float16Module casts every parameter to bf16 (its local norm modules are built in fp32,
        # which its mixed-precision optimizer cannot checkpoint), bf16 inputs in and fp32 outputs out.
        from megatron.core.transformer.module import Float16Module

        module = Float16Module(config, gpt)
    ddp = DistributedDataParallel(config, ddp_config, module)
    schedule = plan if updates_per_step == 1 else dataclasses.replace(
        plan, steps=plan.steps * updates_per_step, warmup_steps=plan.warmup_steps * updates_per_step)
    optimizer, scheduler = build_optimizer(
        ddp, schedule, cfg.optim, indexer_params=indexer_parameters(gpt), bf16=plan.model.params_dtype == "bfloat16",
        distributed_optimizer=cfg.parallel.distributed_optimizer)
    return ModelAndOptimizer(gpt=gpt, ddp=ddp, optimizer=optimizer, scheduler=scheduler, tracker=tracker,
                             n_trainable=n_trainable)


def estimate_flops_per_sequence(gpt: torch.nn.Module, plan: StagePlan, tp: int) -> float:
    """FLOPs of one forward+backward over one sequence (see :func:`~dsa_dist.train.metrics.flops_per_sequence`)."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    embeddings = {id(p) for m in gpt.modules() if isinstance(m, VocabParallelEmbedding) for p in m.parameters()}
    indexer = {id(p) for p in indexer_parameters(gpt)}
    n_mat = n_idx = 0
    for p in gpt.parameters():
        if p.dim() < 2 or id(p) in embeddings:
            continue
        n = p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
        n_mat += n
        n_idx += n if id(p) in indexer else 0
    spec = plan.spec
    return flops_per_sequence(plan.model, n_mat, n_idx, seq_len=plan.model.seq_len,
                              sparse=plan.runtime.attention == "sparse",
                              train_main=spec.trains != "indexer", train_indexer=spec.trains != "main")
