"""Training configuration: nested, typed OmegaConf structured configs with validation (DESIGN.md §3, issue 5 §1).

A run is described by :class:`TrainRunConfig`: one section per concern (``model``, ``parallel``, ``data``,
``train``, ``optim``, ``stages``, ``checkpoint``, ``logging``), each a dataclass whose fields carry a
docstring. :func:`load_config` builds it from defaults ← YAML file ← ``key=value`` dotlist overrides and
validates it; every problem raises ``ValueError`` naming the key path, the bad value and the fix.

The model section is :class:`dsa_dist.model.config.DSAModelConfig`. It starts from the preset named by the
top-level ``model_preset`` (``tiny``, ``small``, ...); fields given under ``model:`` override the preset.
``model.dsa_mode`` is set by each stage (dense for ``dense``/``warmup``, sparse for ``sparse``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dsa_dist.cluster_config import ClusterConfig, validate_cluster
from dsa_dist.model.config import PRESET_NAMES, DSAModelConfig, preset

StageName = Literal["dense", "warmup", "sparse"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


@dataclass
class ParallelConfig:
    """Process layout: world size = tp * cp * pp * dp."""

    tp: int = 1
    """Tensor-parallel size (splits attention heads, MLP and vocabulary)."""
    cp: int = 1
    """Context-parallel size (zigzag split of the sequence; needs model.seq_len % (2*cp) == 0)."""
    pp: int = 1
    """Pipeline-parallel size (dsa-train supports 1)."""
    dp: int = 0
    """Data-parallel size; 0 derives it from the world size (world_size / (tp*cp*pp))."""
    distributed_optimizer: bool = False
    """Shard optimizer state over DP (Megatron DistributedOptimizer, CUDA only); checkpoints stay reshardable."""


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
    tasks: list[str] = field(default_factory=lambda: ["passkey", "multikey", "assoc"])
    """Tasks mixed into training when task_fraction > 0 (passkey, multikey, assoc)."""
    eval_tasks: list[str] = field(default_factory=lambda: ["passkey", "multikey", "assoc"])
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
    """Overrides of the three stage presets (dsa_dist/train/stages.py describes what each stage trains)."""

    dense: StageOverrides = field(default_factory=StageOverrides)
    """Dense pre-training: all parameters but the indexers, LM loss, dense attention."""
    warmup: StageOverrides = field(default_factory=lambda: StageOverrides(lr=1e-3, min_lr=1e-3))
    """Indexer warm-up: only the indexers train, on the dense-attention KL (DeepSeek-V3.2: lr 1e-3)."""
    sparse: StageOverrides = field(default_factory=StageOverrides)
    """Sparse training: top-k attention, all parameters, LM loss + indexer KL on the top-k set."""


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (megatron.core.dist_checkpointing, torch_dist) under <run_dir>/<stage>/checkpoints."""

    interval: int = 0
    """Save every N steps (0: only at the end of a stage)."""
    keep_last: int = 2
    """Keep the newest K checkpoints of each stage (older ones are deleted after a successful save)."""
    resume: bool = True
    """Resume each stage from its latest complete checkpoint, skip stages that already finished."""
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


@dataclass
class TrainRunConfig:
    """A dsa-train run: the stages in ``pipeline`` run in order, each starting from the previous one's result."""

    run_dir: str = "runs/tiny"
    """Output directory: one sub-directory per stage (checkpoints/, tensorboard/, metrics.jsonl)."""
    pipeline: list[StageName] = field(default_factory=lambda: ["dense", "warmup", "sparse"])
    """Stages to run, in order (dense, warmup, sparse)."""
    model_preset: str = "tiny"
    """DSAModelConfig preset that the model section starts from (tiny, tiny-gqa, small, small-gqa, v32-layer)."""
    model: DSAModelConfig = field(default_factory=lambda: preset("tiny"))
    """The model (dsa_dist.model.config.DSAModelConfig); fields here override the preset."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray: placement, restarts and cluster address of `python -m launch` (dsa_dist/cluster_config.py)."""


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _keys_of(node: object) -> str:
    return ", ".join(str(k) for k in node.keys()) if hasattr(node, "keys") else ""


def _as_value_error(err: OmegaConfBaseException, source: str, root: object) -> ValueError:
    key = err.full_key or "?"
    reason = str(getattr(err, "msg", err)).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(root, parent) if parent else root
        where = f"under '{parent}'" if parent else "at the top level"
        return ValueError(f"{source}: unknown config key '{key}'; valid keys {where}: {_keys_of(node)}")
    return ValueError(f"{source}: bad value for '{key}': {reason}. Fix: give a value of the documented type "
                      f"(see dsa_dist/config.py)")


def _select_preset(layers: list[tuple[str, object]]) -> str:
    name = "tiny"
    for _, cfg in layers:
        value = OmegaConf.select(cfg, "model_preset", default=None)
        if value is not None:
            name = str(value)
    if name not in PRESET_NAMES:
        raise ValueError(f"model_preset={name!r} is not a model preset; choose one of {list(PRESET_NAMES)}")
    return name


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                world_size: int | None = None) -> TrainRunConfig:
    """Defaults ← YAML ``path`` (None: no file) ← ``overrides`` (``a.b=c``), validated for ``world_size``.

    ``world_size`` defaults to ``$WORLD_SIZE`` when set (torchrun), else to tp*cp*pp*dp of the config
    (dsa-train then starts that many local processes).
    """
    layers: list[tuple[str, object]] = []
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"config file {path} does not exist")
        layers.append((str(path), OmegaConf.load(path)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"override {bad[0]!r} is not of the form key=value (e.g. train.steps=50)")
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    model_preset = _select_preset(layers)
    base = OmegaConf.structured(TrainRunConfig(model_preset=model_preset, model=preset(model_preset)))
    merged = base
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _as_value_error(err, source, merged) from None
    try:
        cfg: TrainRunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _as_value_error(err, "config", merged) from None
    if world_size is None and "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
    validate_config(cfg, world_size)
    return cfg


def to_yaml(cfg: TrainRunConfig) -> str:
    """The resolved config as YAML (written to <run_dir>/config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: {fix}")


def resolve_world(cfg: TrainRunConfig, world_size: int | None) -> int:
    """Fill ``parallel.dp`` and return the world size; ValueError when the sizes do not multiply out."""
    p = cfg.parallel
    for name in ("tp", "cp", "pp"):
        _require(getattr(p, name) >= 1, f"parallel.{name}", getattr(p, name), "must be >= 1")
    _require(p.dp >= 0, "parallel.dp", p.dp, "must be >= 1, or 0 to derive it from the world size")
    mp = p.tp * p.cp * p.pp
    if world_size is None:
        world_size = mp * max(p.dp, 1)
    if p.dp == 0:
        _require(world_size % mp == 0, "parallel.tp*cp*pp", mp,
                 f"does not divide the world size {world_size}; launch a multiple of {mp} processes")
        p.dp = world_size // mp
    _require(p.tp * p.cp * p.pp * p.dp == world_size, "parallel.dp", p.dp,
             f"world size {world_size} != tp*cp*pp*dp = {p.tp}*{p.cp}*{p.pp}*{p.dp} = {mp * p.dp}; "
             f"set parallel.dp={world_size // mp if world_size % mp == 0 else 0} (0 derives it) or launch "
             f"{mp * p.dp} processes")
    return world_size


def stage_value(cfg: TrainRunConfig, stage: str, name: str) -> object:
    """A per-stage setting: the stage override when set, else the train/optim value."""
    own = getattr(getattr(cfg.stages, stage), name)
    if own is not None:
        return own
    return getattr(cfg.train, name) if hasattr(cfg.train, name) else getattr(cfg.optim, name)


def validate_config(cfg: TrainRunConfig, world_size: int | None = None) -> None:
    """Raise ``ValueError`` (key path, value, fix) for inconsistent settings; fills derived values (dp)."""
    from dsa_dist.train.tasks import TASKS

    world_size = resolve_world(cfg, world_size)
    p, m = cfg.parallel, cfg.model
    _require(p.pp == 1, "parallel.pp", p.pp, "dsa-train runs without pipeline parallelism; set parallel.pp=1")
    if p.cp > 1:
        _require(m.seq_len % (2 * p.cp) == 0, "model.seq_len", m.seq_len,
                 f"not divisible by 2*parallel.cp={2 * p.cp} (zigzag context parallel); use a multiple of "
                 f"{2 * p.cp} or change parallel.cp")
    if "sparse" in cfg.pipeline:
        _require(m.indexer.topk <= m.seq_len, "model.indexer.topk", m.indexer.topk,
                 f"larger than model.seq_len={m.seq_len}: only seq_len keys exist; choose topk < seq_len")
    try:
        m.validate(tp=p.tp, cp=p.cp)
    except ValueError as err:
        raise ValueError(f"model.{err}") from None
    _require(len(cfg.pipeline) > 0, "pipeline", cfg.pipeline, "name at least one stage (dense, warmup, sparse)")
    _require(len(set(cfg.pipeline)) == len(cfg.pipeline), "pipeline", cfg.pipeline, "a stage may appear once")
    order = {"dense": 0, "warmup": 1, "sparse": 2}
    _require([order[s] for s in cfg.pipeline] == sorted(order[s] for s in cfg.pipeline), "pipeline",
             cfg.pipeline, "stages must keep the order dense -> warmup -> sparse")

    t = cfg.train
    _require(t.device != "cuda" or _cuda_available(), "train.device", t.device,
             "CUDA is not available here; use train.device=cpu (or auto)")
    on_cpu = t.device == "cpu" or (t.device == "auto" and not _cuda_available())
    _require(not (on_cpu and m.params_dtype == "bfloat16"), "model.params_dtype", m.params_dtype,
             "training on CPU runs in float32; set model.params_dtype=float32")
    _require(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
    _require(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, "must be >= 0 (0: end of stage)")
    for stage in cfg.pipeline:
        _validate_stage(cfg, stage)

    d = cfg.data
    _require(0.0 <= d.task_fraction <= 1.0, "data.task_fraction", d.task_fraction, "must be in [0, 1]")
    _require(d.eval_samples >= 1 or not d.eval_tasks, "data.eval_samples", d.eval_samples, "must be >= 1")
    for key, names in (("data.tasks", d.tasks), ("data.eval_tasks", d.eval_tasks)):
        unknown = [n for n in names if n not in TASKS]
        _require(not unknown, key, names, f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    _require(d.task_fraction == 0 or len(d.tasks) > 0, "data.tasks", d.tasks,
             "task_fraction > 0 needs at least one task")
    _validate_data(cfg)

    c = cfg.checkpoint
    _require(c.interval >= 0, "checkpoint.interval", c.interval, "must be >= 0 (0: save at the end only)")
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    _require(cfg.logging.log_interval >= 1, "logging.log_interval", cfg.logging.log_interval, "must be >= 1")
    validate_cluster(cfg)


def _validate_stage(cfg: TrainRunConfig, stage: str) -> None:
    key = f"stages.{stage}"
    steps = stage_value(cfg, stage, "steps")
    _require(steps >= 1, f"{key}.steps (or train.steps)", steps, "must be >= 1")
    warmup = stage_value(cfg, stage, "warmup_steps")
    _require(0 <= warmup < steps, f"{key}.warmup_steps (or optim.warmup_steps)", warmup,
             f"must be in [0, steps={steps}) (the LR warmup must end before the stage does)")
    lr, min_lr = stage_value(cfg, stage, "lr"), stage_value(cfg, stage, "min_lr")
    _require(lr > 0, f"{key}.lr (or optim.lr)", lr, "must be > 0")
    _require(0 <= min_lr <= lr, f"{key}.min_lr (or optim.min_lr)", min_lr, f"must be in [0, lr={lr}]")
    ilr = stage_value(cfg, stage, "indexer_lr")
    imin = stage_value(cfg, stage, "indexer_min_lr")
    if ilr is not None:
        _require(ilr > 0, f"{key}.indexer_lr (or optim.indexer_lr)", ilr, "must be > 0")
        if imin is not None:
            _require(0 <= imin <= ilr, f"{key}.indexer_min_lr", imin, f"must be in [0, indexer_lr={ilr}]")
    mbs = stage_value(cfg, stage, "micro_batch_size")
    gbs = stage_value(cfg, stage, "global_batch_size")
    dp = cfg.parallel.dp
    _require(mbs >= 1, f"{key}.micro_batch_size (or train.micro_batch_size)", mbs, "must be >= 1")
    _require(gbs >= 0, f"{key}.global_batch_size (or train.global_batch_size)", gbs, "must be >= 0")
    _require(gbs == 0 or gbs % (mbs * dp) == 0, f"{key}.global_batch_size (or train.global_batch_size)", gbs,
             f"must be a multiple of micro_batch_size*dp = {mbs}*{dp} = {mbs * dp}")


def _validate_data(cfg: TrainRunConfig) -> None:
    """Checks that need the tokenizer: vocabulary size and task lengths."""
    from dsa_dist.train.data import STDLIB_CORPUS, ByteTokenizer, dataset_metadata, load_tokenizer
    from dsa_dist.train.tasks import min_seq_len

    d, m = cfg.data, cfg.model
    if d.corpus == STDLIB_CORPUS:
        tok, vocab = ByteTokenizer(), ByteTokenizer.vocab_size
    else:
        meta = dataset_metadata(d.corpus)
        vocab = int(meta["vocab_size"])
        tok = load_tokenizer(meta["tokenizer"]) if (d.task_fraction > 0 or d.eval_tasks) else None
    _require(m.vocab_size >= vocab, "model.vocab_size", m.vocab_size,
             f"smaller than the tokenizer vocabulary ({vocab}) of data.corpus={d.corpus!r}; use >= {vocab} "
             f"(a multiple of parallel.tp={cfg.parallel.tp})")
    needed = set(d.eval_tasks) | (set(d.tasks) if d.task_fraction > 0 else set())
    for task in sorted(needed):
        need = min_seq_len(task, tok)
        _require(m.seq_len >= need, "model.seq_len", m.seq_len,
                 f"too short for the {task!r} task (needs >= {need}); raise it or drop {task!r} from "
                 "data.tasks/data.eval_tasks")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
