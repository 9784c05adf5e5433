"""Training pipeline (DESIGN.md §3 ``train/``, issue 5; user guide: docs/training.md).

- :mod:`~dsa_dist.train.cli` / :mod:`~dsa_dist.train.prepare_data`: the ``dsa-train`` / ``dsa-prepare-data`` tools;
- :mod:`~dsa_dist.train.loop`: one stage's training loop and the stage pipeline;
- :mod:`~dsa_dist.train.stages`: the dense / warmup / sparse presets;
- :mod:`~dsa_dist.train.data`, :mod:`~dsa_dist.train.tasks`: corpus, packing, sampling, long-context tasks;
- :mod:`~dsa_dist.train.optim`: Megatron optimizer, LR schedule, optimizer step;
- :mod:`~dsa_dist.train.checkpoint`: sharded, atomic, reshardable checkpoints;
- :mod:`~dsa_dist.train.metrics`, :mod:`~dsa_dist.train.evals`: TensorBoard, console, task evals.
"""
