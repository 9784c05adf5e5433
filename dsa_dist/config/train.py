"""The training sections of a run config: data, train, optim, stages, checkpoint and logging.

Each section is a dataclass with a docstring under every field; :mod:`dsa_dist.config.validate` holds the rules
that tie fields together. What each stage trains is described in docs/design.md#training-stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

TaskName = Literal["passkey", "multikey", "assoc"]
"""The generated long-context tasks (dsa_dist/train/tasks.py implements them)."""
TASK_NAMES: tuple[str, ...] = get_args(TaskName)


@dataclass
class DataConfig:
    """Training corpus, generated long-context tasks and evals. The sequence length is ``model.seq_len``."""

    corpus: str = "stdlib"
    """'stdlib' (this machine's Python standard library, byte-tokenized on first use) or the path prefix of a
    dataset made by dsa-prepare-data (<prefix>.bin/.idx/.json)."""
    cache_dir: str = "~/.cache/dsa_dist/data"
    """Where the 'stdlib' corpus is tokenized once."""
    stdlib_max_files: int = 0
    """Use only the first N stdlib files (sorted by path); 0 = all (~1800 files, ~31 MB)."""
    task_fraction: float = 0.0
    """Share of training samples replaced by generated long-context tasks, in [0, 1]."""
    tasks: list[TaskName] = field(default_factory=lambda: list(TASK_NAMES))
    """Tasks mixed into training when task_fraction > 0 (passkey, multikey, assoc)."""
    eval_tasks: list[TaskName] = field(default_factory=lambda: list(TASK_NAMES))
    """Tasks evaluated (exact-answer accuracy) at each eval; an empty list disables task evals."""
    eval_samples: int = 8
    """Samples per eval task."""


@dataclass
class TrainConfig:
    """Steps, batch sizes, seed and device (shared by all stages unless a stage overrides ``steps``)."""

    steps: int = 40
    """Optimizer steps per stage (a stage's own 'steps' wins)."""
    micro_batch_size: int = 2
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all DP ranks; 0 = micro_batch_size * dp (no accumulation). Gradient
    accumulation steps = global_batch_size / (micro_batch_size * dp)."""
    seed: int = 1234
    """Seed of parameter init, data order and task generation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' uses CUDA when available. Use model.params_dtype=float32 on CPU, bfloat16 on GPU."""
    eval_interval: int = 0
    """Run the task evals every N steps (0: only at the end of each stage)."""
    threads: int = 0
    """torch CPU threads per process (0: leave torch's default)."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient norm is NaN/inf is skipped (no update, counted in train/skipped_steps); this
    many skipped steps in a row stop the run with an error (divergence)."""


@dataclass
class OptimConfig:
    """AdamW (Megatron get_megatron_optimizer) and the warmup + decay LR schedule (OptimizerParamScheduler)."""

    lr: float = 3e-3
    """Peak learning rate of the main model parameters."""
    min_lr: float = 3e-4
    """Final learning rate after decay."""
    indexer_lr: float | None = None
    """Peak learning rate of the indexer parameters (None: same as lr)."""
    indexer_min_lr: float | None = None
    """Final learning rate of the indexer parameters (None: indexer_lr * min_lr / lr)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    warmup_steps: int = 5
    """Linear LR warmup steps (must be < the stage's steps)."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """LR decay after warmup, down to min_lr at the stage's last step."""


@dataclass
class StageOverrides:
    """Per-stage values; None inherits from ``train``/``optim``."""

    steps: int | None = None
    """Optimizer steps of this stage."""
    lr: float | None = None
    """Peak LR of the trained parameters (for 'warmup': the indexers)."""
    min_lr: float | None = None
    """Final LR."""
    indexer_lr: float | None = None
    """Peak LR of the indexers in the 'sparse' stage."""
    indexer_min_lr: float | None = None
    """Final LR of the indexers in the 'sparse' stage."""
    warmup_steps: int | None = None
    """LR warmup steps of this stage."""
    micro_batch_size: int | None = None
    """Micro-batch size of this stage."""
    global_batch_size: int | None = None
    """Global batch size of this stage."""


@dataclass
class StagesConfig:
    """Overrides of the stage presets (dsa_dist/train/stages.py describes what each stage trains)."""

    dense: StageOverrides = field(default_factory=StageOverrides)
    """Dense pre-training: all parameters but the indexers, LM loss, dense attention."""
    warmup: StageOverrides = field(default_factory=lambda: StageOverrides(lr=1e-3, min_lr=1e-3))
    """Indexer warm-up: only the indexers train, on the dense-attention KL (DeepSeek-V3.2: lr 1e-3)."""
    sparse: StageOverrides = field(default_factory=StageOverrides)
    """Sparse training: top-k attention, all parameters, LM loss + indexer KL on the top-k set."""
    grpo: StageOverrides = field(default_factory=lambda: StageOverrides(lr=1e-5, min_lr=1e-5, warmup_steps=0))
    """GRPO post-training (settings under ``rl``); steps and warmup_steps count GRPO iterations."""


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (megatron.core.dist_checkpointing, torch_dist) under <run_dir>/<stage>/checkpoints."""

    interval: int = 0
    """Save every N steps (0: only at the end of a stage)."""
    keep_last: int = 2
    """Keep the newest K checkpoints of each stage (older ones are deleted after a successful save)."""
    resume: bool = True
    """Resume each stage from its latest complete checkpoint, skip stages that already finished."""
    on_existing: Literal["error", "move_aside"] = "error"
    """With resume=false and checkpoints of a pipeline stage already in run_dir: 'error' refuses to start;
    'move_aside' renames each such <stage> directory to <stage>.old-<UTC time> and starts fresh."""
    init_from: str | None = None
    """Checkpoint dir whose model weights start the first stage of the pipeline (e.g. a finished 'dense' or
    'warmup' stage of another run); later stages start from the previous stage's final checkpoint."""


@dataclass
class LoggingConfig:
    """Console and TensorBoard logging (<run_dir>/<stage>/tensorboard)."""

    log_interval: int = 5
    """Print a one-line summary and write TensorBoard scalars every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress: Literal["rich", "tqdm", "none"] = "rich"
    """Progress bar style on rank 0."""
    recall: bool = True
    """Measure indexer recall (share of dense attention mass inside the top-k set) on logging steps."""
