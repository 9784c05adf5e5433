"""Optimizer, LR schedule and the optimizer step on Megatron-Core pieces (docs/training.md).

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
  under :func:`dsa_dist.train.cpu_scope.megatron_cpu_scope` (free when the caller already entered it).
"""

from __future__ import annotations

import math

import torch

from dsa_dist.train.cpu_scope import megatron_cpu_scope
from dsa_dist.train.stages import StagePlan


def build_optimizer(ddp_model: torch.nn.Module, plan: StagePlan, optim_cfg, *, indexer_params: list[torch.nn.Parameter],
                    bf16: bool, distributed_optimizer: bool):
    """Megatron AdamW over the trainable parameters + ``OptimizerParamScheduler`` for one stage.

    ``indexer_params`` (the lightning indexers' parameters) get their own LR group. The scheduler is built with
    ``override_opt_param_scheduler=True``: on resume the schedule of the *current* config applies from the
    restored step (see :func:`apply_schedule_after_resume`).
    """
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
    indexer_ids = {id(p) for p in indexer_params}
    indexer_key = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="dsa_indexer", fn=lambda param, name: id(param) in indexer_ids))
    # is_decoupled_lr marks the groups with their own LR schedule; it is also one of the keys Megatron uses to
    # match param groups when loading optimizer state, so indexer and model groups cannot be confused on resume.
    overrides[indexer_key] = {"max_lr": plan.indexer_lr, "min_lr": plan.indexer_min_lr, "is_decoupled_lr": True}
    with megatron_cpu_scope():
        optimizer = get_megatron_optimizer(config, [ddp_model], config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=plan.lr, min_lr=plan.min_lr, lr_warmup_steps=plan.warmup_steps,
        lr_decay_steps=plan.steps, lr_decay_style=optim_cfg.decay_style,
        start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay, wd_incr_steps=plan.steps,
        wd_incr_style="constant", override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


_GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr")


def group_schedule(optimizer) -> list[dict]:
    """Per param group, the schedule values the config gave it (``max_lr``/``min_lr``)."""
    return [{k: g[k] for k in _GROUP_SCHEDULE_KEYS if k in g}
            for opt in _inner_optimizers(optimizer) for g in opt.param_groups]


def apply_schedule_after_resume(optimizer, scheduler, schedule: list[dict]) -> None:
    """Re-apply the current config's per-group LR range after loading an optimizer checkpoint.

    Loading a torch optimizer state restores each param group's ``max_lr``/``min_lr`` from the checkpoint; the
    run's config must win (the scheduler's own values already do: ``override_opt_param_scheduler``), so a
    changed ``optim.lr`` or stage length takes effect from the restored step. ``scheduler.step(0)`` then
    recomputes every group's LR for that step.
    """
    groups = [g for opt in _inner_optimizers(optimizer) for g in opt.param_groups]
    if len(groups) != len(schedule):
        raise ValueError(f"optimizer has {len(groups)} param groups, expected {len(schedule)}")
    for group, values in zip(groups, schedule):
        group.update(values)
    scheduler.step(0)


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
def optimizer_step(optimizer, clip_grad: float, *, loss_finite: bool = True) -> tuple[bool, float]:
    """Clip to ``clip_grad`` (0: off) and step; returns (updated, global grad norm before clipping).

    The update is skipped (``updated`` False, parameters and Adam state untouched) when ``loss_finite`` is False
    or the gradient norm is not finite: ``nan > clip_grad`` is False, so clipping alone would apply NaN.
    ``loss_finite`` must be the same on every rank (a globally reduced loss); the grad norm is.
    """
    with megatron_cpu_scope():
        found_inf = optimizer.prepare_grads()  # main_grad -> grad (fp32 master grads for bf16)
        if found_inf:
            return False, float("nan")
        grad_norm = float(optimizer.get_grad_norm())  # all-reduced over model-parallel ranks, TP duplicates once
        if not loss_finite or not math.isfinite(grad_norm):
            return False, grad_norm
        if clip_grad > 0 and grad_norm > clip_grad:
            coeff = clip_grad / (grad_norm + 1e-6)
            grads = [p.grad for opt in _inner_optimizers(optimizer) for p in opt.get_parameters()
                     if p.grad is not None]
            torch._foreach_mul_(grads, coeff)
        updated = optimizer.step_with_ready_grads()
    return bool(updated), grad_norm
