"""Evaluation of a model during training: held-out LM loss / indexer KL and long-context task accuracy.

:class:`Evaluator` is shared by any trainer: :meth:`~Evaluator.loss` runs fixed batches forward-only through
the stage's :class:`~dsa_dist.train.step.StepFunction` (same loss and reduction as training);
:meth:`~Evaluator.tasks` scores the configured generated tasks (:func:`dsa_dist.train.evals.evaluate_task`).
"""

from __future__ import annotations

from dsa_dist.config import TrainRunConfig
from dsa_dist.train.cpu_scope import in_megatron_cpu_scope
from dsa_dist.train.data import PackedWindows, eval_batches
from dsa_dist.train.evals import evaluate_task
from dsa_dist.train.step import StepFunction


class Evaluator:
    """Held-out losses and task evals of one stage on this rank (collective: every rank calls them)."""

    def __init__(self, cfg: TrainRunConfig, step_fn: StepFunction, windows: PackedWindows, tokenizer) -> None:
        self.cfg, self.step_fn, self.windows, self.tokenizer = cfg, step_fn, windows, tokenizer

    def loss(self, batches: list) -> dict[str, float]:
        """LM loss and indexer KL on fixed full-sequence batches, forward only (parameters untouched)."""
        return self.step_fn.eval_step(batches)

    @in_megatron_cpu_scope
    def tasks(self) -> dict[str, float]:
        """``eval/<task>_acc`` and ``eval/<task>_answer_loss`` for every task in ``data.eval_tasks``."""
        out: dict[str, float] = {}
        d = self.cfg.data
        for task in d.eval_tasks:
            batches = eval_batches(self.windows, self.tokenizer, task, d.eval_samples,
                                   self.step_fn.plan.micro_batch_size, self.cfg.train.seed)
            res = evaluate_task(self.step_fn.parts.gpt, batches, shard=self.step_fn.shard, device=self.step_fn.device)
            out[f"eval/{task}_acc"] = res["acc"]
            out[f"eval/{task}_answer_loss"] = res["answer_loss"]
        return out
