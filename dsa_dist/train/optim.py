"""Optimizer, LR schedule and the optimizer step on Megatron-Core pieces (issue 5 §3).

- :func:`build_optimizer`: ``get_megatron_optimizer`` (AdamW; Megatron falls back to ``torch.optim.AdamW`` when
  neither Transformer Engine nor Apex is installed) with two LR groups -- main model and indexers -- expressed as
  Megatron ``ParamKey`` overrides, plus Megatron's ``OptimizerParamScheduler`` (linear warmup, cosine/linear
  decay to ``min_lr`` at the stage's last step; each group decays between its own max and min LR).
- :func:`optimizer_step`: Megatron's own step decomposition (``prepare_grads`` → ``get_grad_norm`` → clip →
  ``step_with_ready_grads``, as in ``ChainedOptimizer.step``), with the clipping done here by one
  ``torch._foreach_mul_``: Megatron's ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() ==
  'torch.cuda.FloatTensor'`` and therefore cannot run on CPU.
- Megatron-Core 0.16 allocates a few scalars with a literal ``device='cuda'`` (``FP32Optimizer.__init__``'s loss
  scale, ``forward_backward_no_pipelining``'s token counter, the grad-norm's overflow buffer); those calls run
  under :func:`dsa_dist.compat.cuda_literals_to_cpu`.
"""

from __future__ import annotations

import torch

from dsa_dist.compat import cuda_literals_to_cpu
from dsa_dist.train.stages import StagePlan, is_indexer_param


def build_optimizer(ddp_model: torch.nn.Module, plan: StagePlan, optim_cfg, *, bf16: bool,
                    distributed_optimizer: bool):
    """Megatron AdamW over the trainable parameters + ``OptimizerParamScheduler`` for one stage."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer import get_standard_config_overrides as standard_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam", lr=plan.lr, min_lr=plan.min_lr, weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1, adam_beta2=optim_cfg.adam_beta2, adam_eps=optim_cfg.adam_eps,
        # Clipping happens in optimizer_step() (see the module docstring); Megatron must not clip again.
        clip_grad=0.0, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed_optimizer,
    )
    overrides = standard_overrides(config)  # no weight decay on biases / 1-D params, as Megatron does by default
    indexer_key = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="dsa_indexer", fn=lambda param, name: is_indexer_param(name)))
    # is_decoupled_lr marks the groups with their own LR schedule; it is also one of the keys Megatron uses to
    # match param groups when loading optimizer state, so indexer and model groups cannot be confused on resume.
    overrides[indexer_key] = {"max_lr": plan.indexer_lr, "min_lr": plan.indexer_min_lr, "is_decoupled_lr": True}
    with cuda_literals_to_cpu():
        optimizer = get_megatron_optimizer(config, [ddp_model], config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=plan.lr, min_lr=plan.min_lr, lr_warmup_steps=plan.warmup_steps,
        lr_decay_steps=plan.steps, lr_decay_style=optim_cfg.decay_style,
        start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay, wd_incr_steps=plan.steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def group_lrs(optimizer) -> tuple[float | None, float | None]:
    """Current LR of the main-model group and of the indexer group (None where a group is empty)."""
    main = indexer = None
    for opt in _inner_optimizers(optimizer):
        for group in opt.param_groups:
            if not group["params"]:
                continue
            if not group.get("default_config", True):  # only the indexer override changes the LR schedule
                indexer = group["lr"] if indexer is None else indexer
            else:
                main = group["lr"] if main is None else main
    return main, indexer


@torch.no_grad()
def optimizer_step(optimizer, clip_grad: float) -> tuple[bool, float]:
    """Clip to ``clip_grad`` (0: off) and step; returns (updated, global grad norm before clipping)."""
    with cuda_literals_to_cpu():
        found_inf = optimizer.prepare_grads()  # main_grad -> grad (fp32 master grads for bf16)
        if found_inf:
            return False, float("nan")
        grad_norm = float(optimizer.get_grad_norm())  # all-reduced over model-parallel ranks, TP duplicates once
        if clip_grad > 0 and grad_norm > clip_grad:
            coeff = clip_grad / (grad_norm + 1e-6)
            grads = [p.grad for opt in _inner_optimizers(optimizer) for p in opt.get_parameters()
                     if p.grad is not None]
            torch._foreach_mul_(grads, coeff)
        updated = optimizer.step_with_ready_grads()
    return bool(updated), grad_norm
