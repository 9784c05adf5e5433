"""The context-parallel exchanges of one DSA layer (docs/context_parallel.md, "Overlap").

Each is started before the work that needs it and waited for where that work starts, so the transfer runs under
compute; the DSA steps (:mod:`dsa_dist.model.dsa_core`) only call ``wait``:

- :class:`IndexKeys` — this rank's index keys, made from the layer input alone (so before the attention's
  projections): the FP8 keys' all-gather for the ``"allgather"`` top-k and the KL's float keys' all-gather (with
  autograd) start there;
- :class:`PendingKV` — the KV all-gather, started after the projections, awaited after the top-k.

Both autograd gathers defer their backward reduce-scatter to where the gradient is consumed
(``all_gather_sequence(..., defer_backward=True)``). Under ``cp == 1`` nothing moves and the same objects hand
the local tensors back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsa_dist.model.indexer import LightningIndexer
from dsa_dist.parallel import PendingIndexKeys, all_gather_sequence, start_index_key_gather
from dsa_dist.parallel.groups import ParallelDims

if TYPE_CHECKING:
    from dsa_dist.model.dsa_core import DSAInputs


def _gather_sequence(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """This rank's tokens [B, Ll, ...] → the whole sequence [B, L, ...] (autograd: dx reduce-scattered back)."""
    if dims.cp == 1:
        return x
    return all_gather_sequence(x, 1, dims.cp_group)


class PendingKV:
    """The KV all-gather in flight (CP): started after the projections, awaited after the indexer's top-k."""

    def __init__(self, inputs: DSAInputs, dims: ParallelDims) -> None:
        self._v_dim = inputs.v_dim
        self._k = self._v = None
        self._ready: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if dims.cp == 1:
            self._ready = (inputs.k, inputs.v)
            return
        # The backward reduce-scatter of dKV is waited for where the projection's backward consumes it.
        self._k = all_gather_sequence(inputs.k, 1, dims.cp_group, async_op=True, defer_backward=True)
        self._v = None if inputs.v is None else all_gather_sequence(inputs.v, 1, dims.cp_group, async_op=True,
                                                                    defer_backward=True)

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_full, v_full)`` [B, L, Hkv', d] of the whole sequence in global order."""
        if self._ready is None:
            self._ready = (self._k.wait(), None if self._v is None else self._v.wait())
        k_full, v_full = self._ready
        return k_full, (k_full[..., : self._v_dim] if v_full is None else v_full)


class IndexKeys:
    """This rank's index keys k_I [B, Ll, d_I] and, under CP, their exchanges with the other ranks.

    Made from the layer input alone, so an attention can make it *before* its own projections
    (:func:`~dsa_dist.model.dsa_core.plan_dsa_attention`): the all-gathers of the FP8 keys (``"allgather"``
    top-k) and of the KL's float keys then run while the projections compute, instead of on the compute stream's
    critical path right before the top-k and the KL (docs/context_parallel.md, "Overlap"). ``topk_mode`` (the CP
    top-k mode) / ``kl``: prepare and start those exchanges now; anything not started here is prepared (and
    gathered, in line) on first use.
    """

    def __init__(self, indexer: LightningIndexer, h: torch.Tensor, positions: torch.Tensor, dims: ParallelDims, *,
                 topk_mode: str | None = None, kl: bool = False) -> None:
        self._indexer, self._positions, self._dims = indexer, positions, dims
        self.raw = indexer.project_keys(h.detach())  # the indexer trains on detached inputs
        self._topk: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._topk_pending = None
        self._kl: torch.Tensor | None = None
        self._kl_pending = None
        if topk_mode is not None:
            self._topk = indexer.prepare_keys_for_topk(self.raw, positions)
            if dims.cp > 1 and topk_mode == "allgather":
                self._topk_pending = start_index_key_gather(*self._topk, dims.cp_group)
        if kl:
            self._kl = indexer.prepare_keys_for_kl(self.raw, positions)
            if dims.cp > 1:
                # dk_I's reduce-scatter is waited for where the key projection's backward consumes it: that node
                # was made first in the layer, so it runs after the rest of the layer's backward.
                self._kl_pending = all_gather_sequence(self._kl, 1, dims.cp_group, async_op=True,
                                                       defer_backward=True)

    @property
    def positions(self) -> torch.Tensor:
        """[Ll] global positions of the keys."""
        return self._positions

    def for_topk(self) -> tuple[torch.Tensor, torch.Tensor | None, PendingIndexKeys | None]:
        """``(k_index, k_scale, prefetched)``: this rank's scoring-ready keys and their all-gather in flight (or
        None) for :func:`dsa_dist.parallel.distributed_indexer_topk`."""
        if self._topk is None:
            self._topk = self._indexer.prepare_keys_for_topk(self.raw, self._positions)
        return self._topk[0], self._topk[1], self._topk_pending

    def kl_full(self) -> torch.Tensor:
        """The KL's keys [B, L, d_I] of the whole sequence in global order (autograd: the indexer's key path)."""
        if self._kl is None:
            self._kl = self._indexer.prepare_keys_for_kl(self.raw, self._positions)
        if self._kl_pending is not None:
            return self._kl_pending.wait()
        return _gather_sequence(self._kl, self._dims)
