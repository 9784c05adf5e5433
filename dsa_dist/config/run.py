"""The root of a run config: :class:`TrainRunConfig`, one field per section.

Sections live beside this file (``parallel.py``, ``train.py``); the model section is
:class:`dsa_dist.model.config.DSAModelConfig`. A new section is a dataclass field here plus one validator in
:data:`dsa_dist.config.validate.SECTION_VALIDATORS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from dsa_dist.config.cluster import ClusterConfig
from dsa_dist.config.parallel import ParallelConfig
from dsa_dist.config.train import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimConfig,
    StagesConfig,
    TrainConfig,
)
from dsa_dist.model.config import DSAModelConfig, preset
from dsa_dist.rl.config import RLConfig

StageName = Literal["dense", "warmup", "sparse", "grpo"]
"""The training stages, in the only order they may run (each starts from the one before)."""
STAGE_ORDER: tuple[str, ...] = get_args(StageName)


@dataclass
class TrainRunConfig:
    """A dsa-train run: the stages in ``pipeline`` run in order, each starting from the previous one's result."""

    run_dir: str = "runs/tiny"
    """Output directory: one sub-directory per stage (checkpoints/, tensorboard/, metrics.jsonl)."""
    pipeline: list[StageName] = field(default_factory=lambda: ["dense", "warmup", "sparse"])
    """Stages to run, in order (dense, warmup, sparse, grpo); the default is the three pre-training stages."""
    model_preset: str = "tiny"
    """DSAModelConfig preset that the model section starts from (tiny, tiny-gqa, small, small-gqa, v32-layer)."""
    model: DSAModelConfig = field(default_factory=lambda: preset("tiny"))
    """The model architecture (dsa_dist.model.config.DSAModelConfig); fields given here override the preset."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process layout: tensor, context, pipeline and data parallel sizes."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training corpus, generated long-context tasks and evals."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch sizes, seed and device."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    stages: StagesConfig = field(default_factory=StagesConfig)
    """Per-stage overrides of train/optim values."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention, resume and initialisation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console and TensorBoard logging."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray: placement, restarts and cluster address of `python -m launch` (dsa_dist/config/cluster.py)."""
    rl: RLConfig = field(default_factory=RLConfig)
    """GRPO post-training (dsa_dist/rl/config.py), used by the 'grpo' stage."""


def stage_value(cfg: TrainRunConfig, stage: str, name: str) -> object:
    """A per-stage setting: the stage override when set, else the train/optim value."""
    own = getattr(getattr(cfg.stages, stage), name)
    if own is not None:
        return own
    return getattr(cfg.train, name) if hasattr(cfg.train, name) else getattr(cfg.optim, name)
