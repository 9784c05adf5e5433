"""Training pipeline (docs/design.md ``train/``; user guide: docs/training.md; failures: docs/fault_tolerance.md).

- :mod:`~dsa_dist.train.cli` / :mod:`~dsa_dist.train.prepare_data`: the ``dsa-train`` / ``dsa-prepare-data`` tools;
- :mod:`~dsa_dist.train.pipeline`: ``run_pipeline(cfg)`` (all stages, run-dir lock, heartbeats) and
  ``run_stage(cfg, stage, init_from)``;
- trainer parts, reusable by other trainers: :mod:`~dsa_dist.train.setup` (model + optimizer),
  :mod:`~dsa_dist.train.step` (forward step, loss, reduction, non-finite guard),
  :mod:`~dsa_dist.train.checkpoint_manager` (save / latest good / restore, RNG), :mod:`~dsa_dist.train.evaluator`,
  :mod:`~dsa_dist.train.metrics`; :mod:`~dsa_dist.train.trainer`: ``StageTrainer``, the loop of one stage;
- :mod:`~dsa_dist.train.stages`: the dense / warmup / sparse presets;
- :mod:`~dsa_dist.train.data`, :mod:`~dsa_dist.train.tasks`: corpus, packing, sampling, long-context tasks;
- :mod:`~dsa_dist.train.optim`: Megatron optimizer, LR schedule, optimizer step;
- :mod:`~dsa_dist.train.checkpoint`: sharded, atomic, checksummed, reshardable checkpoints;
- :mod:`~dsa_dist.train.run_dir`, :mod:`~dsa_dist.train.heartbeat`, :mod:`~dsa_dist.train.procguard`,
  :mod:`~dsa_dist.train.errors`: run-dir lock, stuck-rank detection, no orphan processes, error types;
- :mod:`~dsa_dist.train.evals`: task evals.
"""
