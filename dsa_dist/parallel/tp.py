"""Tensor-parallel collectives of the DSA layer (docs/design.md §2, TP), beside the CP ones of this package.

Attention heads are split over the TP group; the lightning indexer is replicated, and each TP rank scores only the
strided query rows ``tp_rank::tp`` (balanced under causality, see :mod:`dsa_dist.model.indexer`). These helpers
move tensors between the two layouts:

- *head-split*: ``[B, L, H/tp, ...]`` — this rank's heads, all rows (the attention);
- *row-split*: ``[B, L/tp, ...]`` — rows ``r::tp`` (the indexer's top-k and KL).

Every helper takes the rank's :class:`~dsa_dist.parallel.groups.ParallelDims` and is the identity when ``tp == 1``.
Only :func:`sum_grad_over_tp` is differentiable; the others move detached data (top-k indices, the KL target).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsa_dist.parallel.groups import ParallelDims


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the TP group.

    Megatron's ``copy_to_tensor_model_parallel_region`` does the same but all-reduces ``grad.contiguous()`` and
    returns the original tensor, so a non-contiguous gradient (dense attention's dK of a sliced latent, for
    one) silently stays unreduced; this version reduces a contiguous copy and returns that.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over_tp(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """``x`` unchanged; its gradient is summed over TP ranks.

    For a TP-replicated tensor consumed by head-split work (the MLA latent KV): each rank's heads contribute
    part of its gradient, and the replicated producer (``W_kva``, ``kv_norm``) must see the sum on every rank.
    """
    if dims.tp == 1:
        return x
    return _SumGradOverTP.apply(x, dims.tp_group)


def rows_to_all(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Row-split ``[B, L/tp, ...]`` (rows ``r::tp`` on rank r) → ``[B, L, ...]`` (all rows, in order), every rank.

    Used for the top-k indices: each rank scored its rows, every rank's heads need all of them. No gradient.
    """
    if dims.tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dims.tp)]
    dist.all_gather(parts, x.contiguous(), group=dims.tp_group)
    # Rank j holds rows j, j+tp, ...: stacking on a new dim after the row dim interleaves them back.
    return torch.stack(parts, dim=2).flatten(1, 2)


def heads_to_rows(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Head-split ``[B, L, H/tp, ...]`` → row-split ``[B, L/tp, H, ...]`` (all heads of rows ``r::tp``).

    One all-to-all; used for the (detached) queries and log-sum-exps the KL target of this rank's rows needs.
    Heads come out in global order (rank j's heads are heads ``j*H/tp ...``). No gradient.
    """
    if dims.tp == 1:
        return x
    tp = dims.tp
    send = torch.stack([x[:, j::tp] for j in range(tp)]).contiguous()  # [tp(dest), B, L/tp, H/tp, ...]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=dims.tp_group)  # recv[j]: rank j's heads for my rows
    return recv.movedim(0, 2).flatten(2, 3)


def all_heads(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Head-split ``[B, L, Hkv/tp, d]`` → ``[B, L, Hkv, d]`` on every rank (GQA keys for the KL target). No grad."""
    if dims.tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dims.tp)]
    dist.all_gather(parts, x.contiguous(), group=dims.tp_group)
    return torch.cat(parts, dim=2)
