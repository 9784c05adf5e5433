"""Rules of a resolved run config, each checked once, without I/O and without changing the config.

:func:`validate_config` runs every function of :data:`SECTION_VALIDATORS` in order; each takes the whole
:class:`TrainRunConfig` (rules may tie sections together) and raises ``ValueError`` naming the key path, the bad
value and the fix. A new config section adds its validator to that list. Rules of the model architecture live in
``DSAModelConfig.validate`` and are only called from here. Checks that must read files (tokenizer vocabulary,
task lengths, corpus size) are :func:`dsa_dist.train.data.check_data`, run by the CLI before training.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dsa_dist.config.cluster import validate_cluster
from dsa_dist.config.run import STAGE_ORDER, TrainRunConfig, stage_value
from dsa_dist.rl.config import validate_rl


def require(ok: bool, key: str, value: object, fix: str) -> None:
    """Raise ``ValueError("key=value: fix")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}={value!r}: {fix}")


def validate_parallel(cfg: TrainRunConfig) -> None:
    """Sizes of the (resolved) layout; dsa-train has no pipeline parallelism."""
    p = cfg.parallel
    for name in ("tp", "cp", "pp", "dp"):
        require(getattr(p, name) >= 1, f"parallel.{name}", getattr(p, name), "must be >= 1")
    require(p.pp == 1, "parallel.pp", p.pp, "dsa-train runs without pipeline parallelism; set parallel.pp=1")
    require(p.timeout_s > 0, "parallel.timeout_s", p.timeout_s, "must be > 0 seconds (e.g. 1800)")


def validate_model(cfg: TrainRunConfig) -> None:
    """The architecture's own rules for this layout (head/vocab divisibility, top-k <= seq_len, zigzag CP)."""
    try:
        cfg.model.validate(tp=cfg.parallel.tp, cp=cfg.parallel.cp)
    except ValueError as err:
        msg = str(err)
        # Model messages start with the field path ("indexer.topk=..."): make it the full key path.
        raise ValueError(f"model.{msg}" if re.match(r"[a-z_.]+(=| )", msg) else f"model: {msg}") from None


def validate_pipeline(cfg: TrainRunConfig) -> None:
    """At least one stage, each once, in the order of ``STAGE_ORDER``."""
    stages = list(cfg.pipeline)
    require(len(stages) > 0, "pipeline", stages, f"name at least one stage ({', '.join(STAGE_ORDER)})")
    require(len(set(stages)) == len(stages), "pipeline", stages, "a stage may appear once")
    order = [STAGE_ORDER.index(s) for s in stages]
    require(order == sorted(order), "pipeline", stages, f"stages must keep the order {' -> '.join(STAGE_ORDER)}")
    # The GRPO trainer adds tracker.total() to its loss; full recompute attaches the KL to the layer outputs.
    require(not (cfg.model.recompute.full and "grpo" in stages), "model.recompute.granularity",
            cfg.model.recompute.granularity, "full recompute is not supported by the 'grpo' stage yet; run it with "
            "model.recompute.granularity=none (or selective)")


def validate_train(cfg: TrainRunConfig) -> None:
    """Seed, eval cadence and CPU threads."""
    t = cfg.train
    require(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
    require(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, "must be >= 0 (0: end of stage)")
    require(t.threads >= 0, "train.threads", t.threads, "must be >= 0 (0: torch's default)")
    require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps,
            "must be >= 1 (consecutive non-finite steps before the run stops)")


def validate_stages(cfg: TrainRunConfig) -> None:
    """Steps, LR schedule and batch sizes of every stage in the pipeline (own value or inherited)."""
    dp = cfg.parallel.dp
    for stage in cfg.pipeline:
        key = f"stages.{stage}"
        steps = stage_value(cfg, stage, "steps")
        require(steps >= 1, f"{key}.steps (or train.steps)", steps, "must be >= 1")
        warmup = stage_value(cfg, stage, "warmup_steps")
        require(0 <= warmup < steps, f"{key}.warmup_steps (or optim.warmup_steps)", warmup,
                f"must be in [0, steps={steps}) (the LR warmup must end before the stage does)")
        lr, min_lr = stage_value(cfg, stage, "lr"), stage_value(cfg, stage, "min_lr")
        require(lr > 0, f"{key}.lr (or optim.lr)", lr, "must be > 0")
        require(0 <= min_lr <= lr, f"{key}.min_lr (or optim.min_lr)", min_lr, f"must be in [0, lr={lr}]")
        ilr, imin = stage_value(cfg, stage, "indexer_lr"), stage_value(cfg, stage, "indexer_min_lr")
        if ilr is not None:
            require(ilr > 0, f"{key}.indexer_lr (or optim.indexer_lr)", ilr, "must be > 0")
            if imin is not None:
                require(0 <= imin <= ilr, f"{key}.indexer_min_lr (or optim.indexer_min_lr)", imin,
                        f"must be in [0, indexer_lr={ilr}]")
        mbs, gbs = stage_value(cfg, stage, "micro_batch_size"), stage_value(cfg, stage, "global_batch_size")
        require(mbs >= 1, f"{key}.micro_batch_size (or train.micro_batch_size)", mbs, "must be >= 1")
        require(gbs >= 0, f"{key}.global_batch_size (or train.global_batch_size)", gbs, "must be >= 0")
        require(gbs == 0 or gbs % (mbs * dp) == 0, f"{key}.global_batch_size (or train.global_batch_size)", gbs,
                f"must be a multiple of micro_batch_size*dp = {mbs}*{dp} = {mbs * dp}")


def validate_optim(cfg: TrainRunConfig) -> None:
    """AdamW hyper-parameters (LRs and the schedule are per stage: :func:`validate_stages`)."""
    o = cfg.optim
    require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    require(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, "must be >= 0 (0 disables clipping)")
    require(0 <= o.adam_beta1 < 1, "optim.adam_beta1", o.adam_beta1, "must be in [0, 1)")
    require(0 <= o.adam_beta2 < 1, "optim.adam_beta2", o.adam_beta2, "must be in [0, 1)")
    require(o.adam_eps > 0, "optim.adam_eps", o.adam_eps, "must be > 0")


def validate_data(cfg: TrainRunConfig) -> None:
    """Task mix and eval settings (the corpus itself is checked by ``check_data``, with I/O)."""
    d = cfg.data
    require(bool(d.corpus), "data.corpus", d.corpus, "name a dataset prefix or 'stdlib'")
    require(0.0 <= d.task_fraction <= 1.0, "data.task_fraction", d.task_fraction, "must be in [0, 1]")
    require(d.eval_samples >= 1 or not d.eval_tasks, "data.eval_samples", d.eval_samples, "must be >= 1")
    require(d.task_fraction == 0 or len(d.tasks) > 0, "data.tasks", d.tasks,
            "task_fraction > 0 needs at least one task")
    require(d.stdlib_max_files >= 0, "data.stdlib_max_files", d.stdlib_max_files, "must be >= 0 (0: all files)")


def validate_checkpoint(cfg: TrainRunConfig) -> None:
    """Checkpoint cadence and retention."""
    c = cfg.checkpoint
    require(c.interval >= 0, "checkpoint.interval", c.interval, "must be >= 0 (0: save at the end only)")
    require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    require(c.on_existing in ("error", "move_aside"), "checkpoint.on_existing", c.on_existing,
            "choose 'error' or 'move_aside'")
    require(c.init_from is None or bool(c.init_from), "checkpoint.init_from", c.init_from,
            "give a checkpoint directory or leave it unset (null)")


def validate_logging(cfg: TrainRunConfig) -> None:
    """Logging cadence."""
    require(cfg.logging.log_interval >= 1, "logging.log_interval", cfg.logging.log_interval, "must be >= 1")


def validate_run(cfg: TrainRunConfig) -> None:
    """Top-level keys of the run."""
    require(bool(cfg.run_dir), "run_dir", cfg.run_dir, "name an output directory")


SECTION_VALIDATORS: list[Callable[[TrainRunConfig], None]] = [
    validate_run,
    validate_parallel,
    validate_model,
    validate_pipeline,
    validate_train,
    validate_stages,
    validate_optim,
    validate_data,
    validate_checkpoint,
    validate_logging,
    validate_rl,
    validate_cluster,
]
"""Every rule of a resolved config, in order; a new section appends its validator."""


def validate_config(cfg: TrainRunConfig) -> TrainRunConfig:
    """Raise ``ValueError`` (key path, value, fix) for the first broken rule; returns ``cfg`` unchanged.

    ``cfg`` must be resolved (``parallel.dp`` >= 1, see :func:`dsa_dist.config.load.resolve_config`).
    """
    for check in SECTION_VALIDATORS:
        check(cfg)
    return cfg


def validate_device(cfg: TrainRunConfig, *, cuda_available: bool) -> None:
    """The rules that depend on this machine: ``train.device`` and the CPU float32 rule for ``auto``."""
    t = cfg.train
    require(t.device != "cuda" or cuda_available, "train.device", t.device,
            "CUDA is not available here; use train.device=cpu (or auto)")
    on_cpu = t.device == "cpu" or (t.device == "auto" and not cuda_available)
    require(not (on_cpu and cfg.model.params_dtype == "bfloat16"), "model.params_dtype", cfg.model.params_dtype,
            "training on CPU runs in float32; set model.params_dtype=float32")
