"""Collect the per-layer lightning-indexer KL losses (DESIGN.md §1 "Losses") and the indexer-recall metric.

Each DSA attention layer records its live KL tensor here during the forward pass; the training loop adds
``coeff * tracker.total()`` to its LM loss. The KL's inputs (attention target and, in both modes, the indexer's
inputs) are detached, so this term's gradient reaches the indexer parameters only and the LM loss reaches only
the main model: one backward serves both.

What a recorded value means: the mean KL over the query rows *this rank* scored. Under tensor parallelism each TP
rank scores a disjoint, equally sized subset of rows (the indexer parameters carry
``average_gradients_across_tp_domain`` so Megatron's ``finalize_model_grads`` averages their gradients over TP);
under context parallelism each CP rank scores its own zigzag rows (Megatron's DDP averages over DP×CP). Averaging
the recorded value over the TP and CP groups — :meth:`IndexerLossTracker.values` with ``reduce=True`` — gives
exactly the single-rank mean.

Pipeline parallelism: a KL recorded on a non-last stage never reaches that stage's backward through the loss.
With ``attach_coeff`` set, each layer instead attaches ``attach_coeff * KL`` to its attention output through an
identity autograd function whose backward feeds the KL a gradient of ``attach_coeff`` (the loss itself stays out
of the LM loss); :meth:`total` then refuses, so the two paths cannot be mixed by accident.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class IndexerLossTracker:
    """Per-forward store of each layer's indexer KL (live) and optional recall (detached).

    Args:
        compute_recall: when True, DSA layers also measure the indexer recall on a few sampled query rows
            (share of the dense attention mass covered by the top-k set) — costs an extra partial attention pass,
            so turn it on only on logging steps.
        attach_coeff: None (default): the training loop adds ``coeff * total()``. A float: layers attach the KL
            to their output with this coefficient (for pipeline parallelism), see the module docstring.
        compute_kl: when False, layers skip the KL (stages that do not train the indexer save its cost).
        keep_topk: keep each layer's top-k indices (with the global positions of their query rows) for
            inspection — debugging and the parallel-equivalence tests.
    """

    def __init__(self, compute_recall: bool = False, attach_coeff: float | None = None,
                 keep_topk: bool = False, compute_kl: bool = True) -> None:
        self.compute_kl = compute_kl
        self.compute_recall = compute_recall
        self.attach_coeff = attach_coeff
        self.keep_topk = keep_topk
        self._losses: dict[int, torch.Tensor] = {}
        self._recall: dict[int, torch.Tensor] = {}
        self._topk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        """Forget all recorded values (call before each forward of a micro-batch)."""
        self._losses.clear()
        self._recall.clear()
        self._topk.clear()

    def record(self, layer: int, loss: torch.Tensor) -> None:
        """Store the live KL of ``layer`` (a scalar). A layer recorded twice (e.g. recompute) keeps the latest."""
        if loss.dim() != 0:
            raise ValueError(f"indexer loss must be a scalar, got shape {tuple(loss.shape)}")
        self._losses[layer] = loss

    def record_recall(self, layer: int, recall: torch.Tensor) -> None:
        """Store the (detached) indexer recall of ``layer``."""
        self._recall[layer] = recall.detach().float()

    def record_topk(self, layer: int, positions: torch.Tensor, indices: torch.Tensor) -> None:
        """Keep ``indices`` [B, n, k] (global key indices) of the query rows at global ``positions`` [n]."""
        if self.keep_topk:
            self._topk[layer] = (positions.detach().cpu(), indices.detach().cpu())

    def topk(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: (query positions [n], top-k indices [B, n, k]) as kept with ``keep_topk=True``."""
        return dict(self._topk)

    @property
    def layers(self) -> list[int]:
        return sorted(self._losses)

    def total(self) -> torch.Tensor:
        """Sum over layers of the live per-layer KL (0 if nothing was recorded); differentiable."""
        if self.attach_coeff is not None:
            raise RuntimeError("IndexerLossTracker(attach_coeff=...) attaches the KL to the layer outputs; "
                               "do not add total() to the loss as well (use values() for logging)")
        if not self._losses:
            return torch.zeros(())
        return torch.stack([self._losses[k] for k in self.layers]).sum()

    def values(self, reduce: bool = False, groups: tuple = ()) -> dict[int, float]:
        """Detached per-layer KL as floats; ``reduce=True`` averages each over ``groups`` (default: TP and CP)."""
        return self._as_floats(self._losses, reduce, groups)

    def recall(self, reduce: bool = False, groups: tuple = ()) -> dict[int, float]:
        """Detached per-layer recall as floats (only layers that measured it); ``reduce`` as in :meth:`values`."""
        return self._as_floats(self._recall, reduce, groups)

    @staticmethod
    def _as_floats(store: dict[int, torch.Tensor], reduce: bool, groups: tuple) -> dict[int, float]:
        keys = sorted(store)
        if not keys:
            return {}
        vec = torch.stack([store[k].detach().float().reshape(()) for k in keys])
        if reduce and dist.is_initialized():
            for group in groups or _default_groups():
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(vec, group=group)
                    vec = vec / dist.get_world_size(group)
        return dict(zip(keys, vec.tolist()))


def _default_groups() -> tuple:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return ()
    return (ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group())


class _AttachLoss(torch.autograd.Function):
    """Identity on ``out``; in backward gives ``loss`` the gradient ``coeff`` (so the loss trains its indexer)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        shape, dtype, device = ctx.loss_meta
        return grad_out, torch.full(shape, ctx.coeff, dtype=dtype, device=device), None


def attach_loss(out: torch.Tensor, loss: torch.Tensor, coeff: float) -> torch.Tensor:
    """Return ``out`` unchanged, wired so that its backward also backpropagates ``coeff * loss``."""
    return _AttachLoss.apply(out, loss, coeff)
