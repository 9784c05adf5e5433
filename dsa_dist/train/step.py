"""One optimizer step of a stage: forward step, loss, report reduction, non-finite guard (docs/training.md).

One optimizer step::

    forward_backward(forward_step, micro_batches)     # Megatron schedule; DDP reduces grads over DP x CP
    finalize_model_grads                              # (called by the schedule) + divide by the global token count
    reduce the reports over micro-batches and ranks   # LM loss, indexer KL, recall
    optimizer_step: prepare -> grad norm -> clip -> Adam, skipped when the loss or the grad norm is not finite
    scheduler.step(1)                                 # only after an applied update (as Megatron does)

Loss (per-token normalisation, ``calculate_per_token_loss``): each micro-batch returns ``sum of masked LM losses
+ coeff * KL * local tokens`` and its token count (under full activation recompute the layers attach the KL to
their outputs with that same weight, see :mod:`dsa_dist.model.indexer_loss`, and the loss holds the LM term);
Megatron sums gradients over micro-batches and DP x CP ranks and divides by the global token count, so both
terms are exact global per-token means whatever the accumulation and CP/DP layout. The indexer KL is a per-row
mean, hence the scaling by the local token count.

Non-finite guard: a step whose reduced loss or global grad norm is NaN/inf changes nothing (parameters, Adam
moments and LR schedule stay as they were; the data stream moves on); :class:`StepFunction` counts such steps
(:class:`NonFiniteGuard`) and raises :class:`~dsa_dist.train.errors.NonFiniteError` after
``train.max_nonfinite_steps`` in a row.
Megatron's own checks do not fit here: DDP's ``check_for_nan_in_grad`` raises at the first NaN instead of
skipping, and the optimizer's ``found_inf`` skip exists only with an fp16 loss scaler (it is honoured too).
"""

from __future__ import annotations

import hashlib
import math
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from dsa_dist.parallel import ParallelDims, zigzag_split
from dsa_dist.train.cpu_scope import in_megatron_cpu_scope
from dsa_dist.train.errors import NonFiniteError
from dsa_dist.train.optim import group_lrs, optimizer_step
from dsa_dist.train.setup import ModelAndOptimizer
from dsa_dist.train.stages import StagePlan


def fingerprint(micro_batches: list) -> str:
    """A short digest of this rank's sample ids and tokens of one step (to compare data order across runs)."""
    h = hashlib.blake2b(digest_size=8)
    for b in micro_batches:
        h.update(b.sample_ids.numpy().tobytes())
        h.update(b.tokens.numpy().tobytes())
    return h.hexdigest()


class StepFunction:
    """Forward step, loss and one optimizer step of a stage on this rank (reusable by any trainer).

    Args:
        parts: model, DDP wrapper, optimizer and scheduler (:func:`~dsa_dist.train.setup.build_model_and_optimizer`).
        plan: the stage (losses, shapes, micro-batch size).
        dims: this rank's place in the TP/CP/DP grid.
        device: where the batches go.
        clip_grad: global grad-norm clip (0: off).
        max_nonfinite_steps: stop after this many consecutive skipped (non-finite) steps.
    """

    def __init__(self, parts: ModelAndOptimizer, plan: StagePlan, dims: ParallelDims, device: torch.device, *,
                 clip_grad: float, max_nonfinite_steps: int) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.parts, self.plan, self.dims, self.device = parts, plan, dims, device
        self.clip_grad, self.max_nonfinite_steps = clip_grad, max_nonfinite_steps
        self.forward_backward = get_forward_backward_func()
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self._measure_recall = False  # set per step; read by forward_step (recall costs a dense pass on few rows)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because of a non-finite loss or grad norm (this stage, restored on resume)."""
        return self.guard.skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.guard.skipped = value

    @property
    def nonfinite_in_row(self) -> int:
        """Consecutive skipped steps up to the last one."""
        return self.guard.in_row

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """Full-sequence ``[b, L]`` -> this CP rank's zigzag shard ``[b, L/cp]``."""
        return zigzag_split(x, 1, self.dims.cp, self.dims.cp_rank)

    # ------------------------------------------------------------------------------------------ Megatron hooks
    def forward_step(self, data_iterator, model):
        """Megatron ``forward_step_func``: next micro-batch -> (per-token loss, loss function)."""
        batch = next(data_iterator)
        tokens, labels, mask = (self.shard(t).to(self.device, non_blocking=True)
                                for t in (batch.tokens, batch.labels, batch.loss_mask))
        # Attaching tracker (full recompute): the KL's weight in this micro-batch's loss is coeff * its tokens,
        # as in loss_func's added term.
        self.parts.tracker.begin_forward(measure_recall=self._measure_recall, attach_scale=mask.sum())
        per_token_loss = model(tokens, None, None, labels=labels)  # [b, s_local] fp32 (vocab-parallel CE)
        return per_token_loss, partial(self.loss_func, mask)

    def loss_func(self, mask: torch.Tensor, per_token_loss: torch.Tensor):
        """(loss to backprop, token count, {"report": [lm_sum, tokens, kl, recall], "kl_layers": [...]}) of one
        micro-batch. ``kl_layers``: the per-layer KL value tensors; a fused sparse KL's is filled by the backward,
        so the KL entry of the report is summed from them in :meth:`reduce_reports`, after the backward."""
        tracker, spec = self.parts.tracker, self.plan.spec
        n_tokens = mask.sum()
        lm_sum = (per_token_loss.float() * mask).sum()
        attached = tracker.attach_coeff is not None  # the layers attached the KL to their outputs (recompute)
        kl = (tracker.logged_total() if attached else tracker.total()).to(lm_sum.device) if tracker.layers \
            else torch.zeros((), device=lm_sum.device)
        loss = torch.zeros((), device=lm_sum.device)
        if spec.lm_loss:
            loss = loss + lm_sum
        elif attached:
            # The attached KL's gradient flows only in a backward through the model's output: route it there
            # with a zero LM weight (the stage trains no parameter that the LM loss reaches).
            loss = loss + 0.0 * lm_sum
        if spec.indexer_loss and not attached:
            # KL is a mean over rows: scale to this micro-batch's tokens
            loss = loss + self.plan.model.indexer_loss_coeff * kl * n_tokens
        recall = tracker.recall()
        report = torch.stack([lm_sum.detach(), n_tokens.detach().float(), kl.detach().float(),
                              torch.tensor(float(np.mean(list(recall.values()))) if recall else float("nan"),
                                           device=lm_sum.device)])
        return loss, n_tokens.detach().int(), {"report": report, "kl_layers": tracker.value_tensors()}

    def reduce_reports(self, reports: list[dict]) -> tuple[float, float, float | None]:
        """(LM loss, indexer KL, recall or None) of a step, reduced over micro-batches and all ranks (collective).

        [lm_sum, tokens] are duplicated on TP peers (their ratio is unaffected); KL and recall are per-rank means
        over equally sized row sets, so their average over all ranks is the global mean.
        """
        r = torch.stack([x["report"] for x in reports]).to(torch.float64)  # [micro, 4]
        # The KL values as they are now, after the backward (a fused sparse KL is written there).
        r[:, 2] = torch.stack([torch.stack(x["kl_layers"]).double().sum().to(r.device) if x["kl_layers"]
                               else r.new_zeros(()) for x in reports])
        has_recall = not torch.isnan(r[:, 3]).any()
        vec = torch.stack([r[:, 0].sum(), r[:, 1].sum(), r[:, 2].mean(),
                           r[:, 3].mean() if has_recall else torch.zeros((), dtype=torch.float64, device=r.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
            vec[2:] /= dist.get_world_size()
        return float(vec[0] / vec[1]), float(vec[2]), float(vec[3]) if has_recall else None

    def _run_schedule(self, batches: list, *, forward_only: bool, micro_batch_size: int) -> list[dict]:
        return self.forward_backward(
            forward_step_func=self.forward_step, data_iterator=iter(batches), model=[self.parts.ddp],
            num_microbatches=len(batches), seq_length=self.plan.model.seq_len // self.dims.cp,
            micro_batch_size=micro_batch_size, forward_only=forward_only)

    # ------------------------------------------------------------------------------------------ steps
    @in_megatron_cpu_scope
    def train_step(self, micro_batches: list, *, measure_recall: bool = False) -> dict:
        """One optimizer step over ``micro_batches`` (this DP rank's share of a global batch); collective.

        Returns the step's globally reduced metrics: ``loss, lm_loss, indexer_kl, indexer_recall, grad_norm, lr,
        indexer_lr, updated, skipped`` (``skipped``: the update was dropped as non-finite) and ``data`` (digest).
        """
        p = self.parts
        self._measure_recall = measure_recall
        p.ddp.zero_grad_buffer()
        p.optimizer.zero_grad()
        reports = self._run_schedule(micro_batches, forward_only=False, micro_batch_size=self.plan.micro_batch_size)
        lm_loss, kl, recall = self.reduce_reports(reports)
        spec, coeff = self.plan.spec, self.plan.model.indexer_loss_coeff
        loss = (lm_loss if spec.lm_loss else 0.0) + (coeff * kl if spec.indexer_loss else 0.0)
        loss_finite = math.isfinite(lm_loss) and math.isfinite(kl)
        updated, grad_norm = optimizer_step(p.optimizer, self.clip_grad, loss_finite=loss_finite)
        skipped = not (loss_finite and math.isfinite(grad_norm))
        if updated:
            p.scheduler.step(1)
        self.guard.record(skipped)
        lr, indexer_lr = group_lrs(p.optimizer)
        return {"loss": loss, "lm_loss": lm_loss, "indexer_kl": kl, "indexer_recall": recall,
                "grad_norm": grad_norm, "lr": lr, "indexer_lr": indexer_lr, "updated": updated, "skipped": skipped,
                "data": fingerprint(micro_batches)}

    def check_divergence(self, step: int) -> None:
        """Raise :class:`NonFiniteError` after ``max_nonfinite_steps`` skipped steps in a row."""
        self.guard.check(f"step {step}")

    @torch.no_grad()
    @in_megatron_cpu_scope
    def eval_step(self, batches: list) -> dict[str, float]:
        """LM loss and indexer KL on fixed full-sequence batches, forward only (parameters untouched)."""
        self._measure_recall = False
        reports = self._run_schedule(batches, forward_only=True, micro_batch_size=batches[0].tokens.shape[0])
        lm_loss, kl, _ = self.reduce_reports(reports)
        return {"lm_loss": lm_loss, "indexer_kl": kl}


class NonFiniteGuard:
    """Counts optimizer steps skipped as non-finite and stops a run after ``max_in_row`` of them in a row.

    Shared by every trainer (:class:`StepFunction`, the GRPO trainer): the caller skips the update itself
    (:func:`~dsa_dist.train.optim.optimizer_step` with ``loss_finite``), then records and checks here.
    """

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.skipped = 0
        """Skipped steps in this stage (trainers checkpoint it)."""
        self.in_row = 0
        """Consecutive skipped steps up to the last recorded one."""

    def record(self, skipped: bool) -> None:
        """Count one optimizer step (``skipped``: its update was dropped as non-finite)."""
        self.skipped += int(skipped)
        self.in_row = self.in_row + 1 if skipped else 0

    def check(self, where: str) -> None:
        """Raise :class:`NonFiniteError` after ``max_in_row`` skipped steps in a row (``where``: e.g. "step 7")."""
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(
                f"training diverged: {self.in_row} steps in a row (up to {where}) had a non-finite loss or gradient "
                f"norm and were skipped (train.max_nonfinite_steps={self.max_in_row}). Lower the learning rate "
                "(optim.lr / stages.<stage>.lr) or clip harder (optim.clip_grad), and resume from the last "
                "checkpoint (every saved checkpoint holds finite weights)")


def parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite on every rank (collective when distributed)."""
    params = list(model.parameters())
    bad = torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)
    for p in params:
        if not bool(torch.isfinite(p.detach()).all()):
            bad += 1
            break
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return float(bad) == 0.0
