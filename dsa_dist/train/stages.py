"""The three pre-training stages of DeepSeek-V3.2's DSA recipe as presets (docs/design.md "Losses").

=========  ===========  ========================  ==========================================================
stage      attention    trains                    loss
=========  ===========  ========================  ==========================================================
dense      dense        everything but indexers   LM loss (ordinary pre-training: the dense starting point)
warmup     dense        the indexers only         indexer KL to the dense attention distribution
sparse     top-k        everything                LM loss + coeff * KL on the top-k set (indexer inputs
                                                  detached); indexers have their own learning rate
grpo       top-k        everything                GRPO policy loss + coeff * indexer KL (dsa_dist/rl/trainer.py)
=========  ===========  ========================  ==========================================================

Stages are chained by checkpoints: a stage starts from the final model weights of the previous stage (or from
``checkpoint.init_from``) with a fresh optimizer and LR schedule, and continues the data stream where the
previous stage stopped. :func:`resolve_stage` turns a :class:`~dsa_dist.config.TrainRunConfig` into the
concrete settings of one stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dsa_dist.config import TrainRunConfig, stage_value
from dsa_dist.model.config import DSAModelConfig
from dsa_dist.model.runtime import DSARuntime


@dataclass(frozen=True)
class StageSpec:
    """What a stage does (fixed by the recipe; hyper-parameters live in the config)."""

    name: str
    attention: Literal["dense", "sparse"]
    trains: Literal["main", "indexer", "all"]
    lm_loss: bool
    indexer_loss: bool


STAGES: dict[str, StageSpec] = {
    "dense": StageSpec("dense", attention="dense", trains="main", lm_loss=True, indexer_loss=False),
    "warmup": StageSpec("warmup", attention="dense", trains="indexer", lm_loss=False, indexer_loss=True),
    "sparse": StageSpec("sparse", attention="sparse", trains="all", lm_loss=True, indexer_loss=True),
    # GRPO post-training: the policy loss replaces the LM loss (dsa_dist/rl/trainer.py).
    "grpo": StageSpec("grpo", attention="sparse", trains="all", lm_loss=False, indexer_loss=True),
}


@dataclass(frozen=True)
class StagePlan:
    """The resolved settings of one stage."""

    spec: StageSpec
    model: DSAModelConfig  # the run's (immutable) model config
    runtime: DSARuntime  # what the DSA layers compute in this stage (attention kind, indexer KL)
    steps: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int  # gradient accumulation steps
    lr: float
    min_lr: float
    indexer_lr: float
    indexer_min_lr: float
    warmup_steps: int


def resolve_stage(cfg: TrainRunConfig, stage: str) -> StagePlan:
    """Stage preset + the config's per-stage overrides -> :class:`StagePlan` (config must be validated)."""
    spec = STAGES[stage]
    runtime = DSARuntime(attention=spec.attention, indexer_kl=spec.indexer_loss)
    mbs = int(stage_value(cfg, stage, "micro_batch_size"))
    gbs = int(stage_value(cfg, stage, "global_batch_size")) or mbs * cfg.parallel.dp
    lr, min_lr = float(stage_value(cfg, stage, "lr")), float(stage_value(cfg, stage, "min_lr"))
    if spec.trains == "indexer":
        # Warm-up trains only the indexers, at the stage's lr (DeepSeek-V3.2: 1e-3).
        indexer_lr, indexer_min_lr = lr, min_lr
    else:
        ilr = stage_value(cfg, stage, "indexer_lr")
        indexer_lr = float(ilr) if ilr is not None else lr
        imin = stage_value(cfg, stage, "indexer_min_lr")
        indexer_min_lr = float(imin) if imin is not None else indexer_lr * min_lr / lr
    return StagePlan(spec=spec, model=cfg.model, runtime=runtime, steps=int(stage_value(cfg, stage, "steps")),
                     micro_batch_size=mbs, global_batch_size=gbs, num_microbatches=gbs // (mbs * cfg.parallel.dp),
                     lr=lr, min_lr=min_lr,
                     indexer_lr=indexer_lr, indexer_min_lr=indexer_min_lr,
                     warmup_steps=int(stage_value(cfg, stage, "warmup_steps")))


def indexer_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of every :class:`~dsa_dist.model.indexer.LightningIndexer` in ``model`` (by module type)."""
    from dsa_dist.model.indexer import LightningIndexer

    seen: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, LightningIndexer):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def set_trainable(model: torch.nn.Module, spec: StageSpec) -> tuple[int, int]:
    """Freeze/unfreeze parameters for ``spec`` (before wrapping in DDP); returns (trainable, frozen) counts."""
    indexer = {id(p) for p in indexer_parameters(model)}
    trainable = frozen = 0
    for p in model.parameters():
        p.requires_grad_(spec.trains == "all" or (spec.trains == "indexer") == (id(p) in indexer))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    if trainable == 0:
        raise ValueError(f"stage {spec.name!r} has no trainable parameters (no indexer found in the model?)")
    return trainable, frozen
