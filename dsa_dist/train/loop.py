"""Compatibility module: the trainer now lives in parts (setup, step, checkpoint_manager, evaluator, trainer,
pipeline). ``StageTrainer`` and ``run_pipeline`` stay importable from here until every caller has moved."""

from dsa_dist.train.pipeline import run_pipeline, run_stage
from dsa_dist.train.trainer import StageTrainer

__all__ = ["StageTrainer", "run_pipeline", "run_stage"]
