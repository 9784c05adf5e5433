"""Compatibility module: the trainer now lives in parts (setup, step, checkpoint_manager, evaluator, trainer,
pipeline). ``StageTrainer``, ``run_pipeline`` and the RNG helpers stay importable from here until every caller
has moved to :mod:`dsa_dist.train.trainer`, :mod:`dsa_dist.train.pipeline` and
:mod:`dsa_dist.train.checkpoint_manager`."""

from dsa_dist.train.checkpoint_manager import rng_state as _rng_state
from dsa_dist.train.checkpoint_manager import set_rng_state as _set_rng_state
from dsa_dist.train.pipeline import run_pipeline, run_stage
from dsa_dist.train.trainer import StageTrainer

__all__ = ["StageTrainer", "run_pipeline", "run_stage", "_rng_state", "_set_rng_state"]
