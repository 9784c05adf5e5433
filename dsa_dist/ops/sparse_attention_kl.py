"""Sparse attention with the sparse-stage indexer KL fused into its backward (docs/design.md, "Indexer losses").

The unfused sparse KL (:func:`dsa_dist.ops.indexer_kl_loss_sparse`) rebuilds its target

    p_attn[t, j] = (1/H) Σ_h exp(scale · q_h[t]·K[idx[t, j]] − lse_h[t])

from q, the keys and the attention's lse: H·d_qk work per (query, selected key), as much as the attention's
forward logits. The attention backward recomputes exactly these probabilities P = exp(S − lse) to form dS, so
summing P over heads there gives p_attn for free. This op therefore splits the KL's *value* from its *gradient*:

* forward: the sparse attention ``(out, lse)`` and a scalar ``kl_proxy`` whose value is 0;
* backward: with p_attn from the attention backward, the gradient of the KL w.r.t. the indexer inputs
  ``q_index``, ``k_index``, ``weights`` is ``grad_kl_proxy · ∂KL/∂(indexer)`` — the exact gradient of
  :func:`indexer_kl_loss_sparse` (mean over the B·Lq rows; −1 slots and rows without keys contribute nothing),
  so ``grad_kl_proxy`` carries the KL coefficient and any loss scale. The true KL value is computed there from
  the same p_attn and written in place into ``kl_value`` (a 0-dim float32 tensor, NaN until then).

**The KL value of a step is known only after its backward.** A caller that logs it reads ``kl_value`` after
``backward()``; adding ``kl_proxy`` to the loss (or attaching it with
:func:`dsa_dist.model.indexer_loss.attach_loss`) changes the loss value by 0 and its gradients exactly as the
unfused KL would. If nothing depends on ``kl_proxy`` the backward skips the KL and ``kl_value`` stays NaN.
Activation recompute needs nothing special: the KL's gradient arrives through the attention's own backward.

Tensor parallelism (``head_group``): each rank holds H/tp heads of every local query and trains the indexer on
the query rows ``rank::tp``. Its backward's p_attn is then a partial mean over its heads; one all-reduce of the
[B, Lq, k] fp32 partials over the group (instead of moving q [B, Lq, H, d_qk] to the rows' owners, as the
separate op's all-to-all does) gives every rank the full target, of which it uses its rows.

This is the reference (PyTorch) implementation, the ground truth of the Triton one
(:mod:`kernels.sparse_attention_kl`), which has the same signature; its backward recomputes the reference
attention under autograd and p_attn chunk by chunk (:func:`dsa_dist.ops.kl.sparse_attention_target`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsa_dist.ops._checks import check_positive_int
from dsa_dist.ops.indexer import _check_score_inputs
from dsa_dist.ops.kl import indexer_kl_from_target, sparse_attention_target
from dsa_dist.ops.sparse_attention import _check_inputs, sparse_attention


def head_group_rows(head_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, size)`` of the head (TP) group, ``(0, 1)`` without one: the indexer trains on rows rank::size."""
    if head_group is None:
        return 0, 1
    return dist.get_rank(head_group), dist.get_world_size(head_group)


def full_target_rows(p_local: torch.Tensor, topk: torch.Tensor, head_group: dist.ProcessGroup | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the all-head p_attn from its partial head-mean ``p_local`` [B, Lq, k] (in place), and
    their indices: the mean of the ranks' equal-size head means is the mean over all heads."""
    rank, size = head_group_rows(head_group)
    if size == 1:
        return p_local, topk
    p_local.div_(size)
    dist.all_reduce(p_local, group=head_group)
    return p_local[:, rank::size].contiguous(), topk[:, rank::size].contiguous()


def check_fused_kl_inputs(q: torch.Tensor, topk_indices: torch.Tensor, q_index: torch.Tensor,
                          k_index: torch.Tensor, weights: torch.Tensor, k_scale: torch.Tensor | None,
                          lk: int, head_group: dist.ProcessGroup | None = None) -> None:
    """The indexer side of the fused op: [B, Lq, k] indices; q_index/weights rows as q's (rows rank::tp under a
    head group), k_index keys as k's."""
    if topk_indices.dim() != 3:
        raise ValueError(f"topk_indices must be [B, Lq, k] (shared by all heads) for the fused indexer KL, got "
                         f"{tuple(topk_indices.shape)}; per-KV-group indices have no single KL target")
    _check_score_inputs(q_index, k_index, weights, k_scale)
    b, lq = q.shape[:2]
    _, size = head_group_rows(head_group)
    if lq % size:
        raise ValueError(f"the query length {lq} must be divisible by the head group's size {size} (the indexer "
                         "trains on rows rank::size)")
    if q_index.shape[:2] != (b, lq // size):
        raise ValueError(f"q_index must be [B={b}, Lq={lq // size}, H_I, d_I] (the attention's query rows"
                         f"{'' if size == 1 else f' rank::{size}'}), got {tuple(q_index.shape)}")
    if k_index.shape[:2] != (b, lk):
        raise ValueError(f"k_index must be [B={b}, Lk={lk}, d_I] (the attention's keys), got {tuple(k_index.shape)}")


class _SparseAttentionKL(torch.autograd.Function):
    """Reference fused op: inputs q, k, v, q_index, k_index, weights (differentiable), then the rest."""

    @staticmethod
    def forward(ctx, q, k, v, q_index, k_index, weights, topk_indices, scale, k_scale, kl_value, chunk_size,
                head_group):
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            out, lse = sparse_attention(q, k, v, topk_indices, scale, chunk_size=chunk_size, indices_checked=True)
        ctx.save_for_backward(q, k, v, q_index, k_index, weights, topk_indices, lse, k_scale)
        ctx.scale, ctx.chunk_size, ctx.kl_value, ctx.head_group = scale, chunk_size, kl_value, head_group
        ctx.mark_non_differentiable(lse)
        return out, lse, lse.new_zeros(())

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_kl):
        q, k, v, q_index, k_index, weights, topk, lse, k_scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * 12
        attn_leaves = [(i, x.detach().requires_grad_()) for i, x in enumerate((q, k, v)) if needs[i]]
        if grad_out is not None and attn_leaves:
            with torch.enable_grad():
                leaves = {i: x for i, x in attn_leaves}
                args = [leaves.get(i, x.detach()) for i, x in enumerate((q, k, v))]
                out, _ = sparse_attention(*args, topk, ctx.scale, chunk_size=ctx.chunk_size, indices_checked=True)
            for (i, _), g in zip(attn_leaves, torch.autograd.grad(out, [x for _, x in attn_leaves], grad_out)):
                grads[i] = g
        if grad_kl is None:  # nothing used kl_proxy: no KL this step (kl_value stays NaN)
            return tuple(grads)
        compute = torch.float64 if q.dtype == torch.float64 or q_index.dtype == torch.float64 else torch.float32
        target = torch.cat([
            sparse_attention_target(q[:, s:s + ctx.chunk_size], k, topk[:, s:s + ctx.chunk_size],
                                    lse[:, s:s + ctx.chunk_size], ctx.scale, compute)
            for s in range(0, q.shape[1], ctx.chunk_size)
        ], 1)  # [B, Lq, k] — what the Triton backward sums from its P tiles
        target, topk = full_target_rows(target, topk, ctx.head_group)
        idx_leaves = [(i, x.detach().requires_grad_()) for i, x in zip((3, 4, 5), (q_index, k_index, weights))
                      if needs[i]]
        with torch.enable_grad():
            leaves = {i: x for i, x in idx_leaves}
            qi, ki, w = (leaves.get(i, x.detach()) for i, x in zip((3, 4, 5), (q_index, k_index, weights)))
            kl = indexer_kl_from_target(target, qi, ki, w, topk, k_scale=k_scale, chunk_size=ctx.chunk_size)
        ctx.kl_value.copy_(kl.detach())
        if idx_leaves:
            for (i, _), g in zip(idx_leaves, torch.autograd.grad(kl, [x for _, x in idx_leaves], grad_kl)):
                grads[i] = g
        return tuple(grads)


def sparse_attention_with_indexer_kl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_indices: torch.Tensor,
    softmax_scale: float | None,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    *,
    chunk_size: int = 256,
    indices_checked: bool = False,
    head_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse attention whose backward also trains the indexer by the sparse KL (see the module docstring).

    Args:
        q, k, v, topk_indices, softmax_scale, indices_checked: as :func:`dsa_dist.ops.sparse_attention`, with
            ``topk_indices`` [B, Lq, k] shared by all heads (the KL's selected sets).
        q_index: [B, Lq, H_I, d_I], k_index: [B, Lk, d_I], weights: [B, Lq, H_I], k_scale: [B, Lk] or None — the
            indexer's inputs as :func:`dsa_dist.ops.indexer_kl_loss_sparse` takes them (the model passes the
            FP8-fake-quantised ones); only these receive the KL's gradient.
        chunk_size: query rows per chunk of the reference computation.
        head_group: the process group the heads are split over (tensor parallelism), or None. Then q holds this
            rank's heads of all Lq rows, ``q_index`` / ``weights`` the rows ``rank::size`` [B, Lq/size, ...], and
            the backward all-reduces p_attn over the group (every rank of it must run this backward).

    Returns:
        ``(out [B, Lq, H, d_v], lse [B, Lq, H], kl_proxy, kl_value)``: out and lse exactly as
        :func:`~dsa_dist.ops.sparse_attention`; ``kl_proxy`` a 0-dim tensor of value 0 whose gradient is the mean
        sparse KL's; ``kl_value`` a 0-dim float32 tensor filled with the KL value during the backward (NaN before).
    """
    _check_inputs(q, k, v, topk_indices, indices_checked)
    check_fused_kl_inputs(q, topk_indices, q_index, k_index, weights, k_scale, k.shape[1], head_group)
    check_positive_int("chunk_size", chunk_size)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    kl_value = torch.full((), float("nan"), dtype=torch.float32, device=q.device)
    out, lse, kl_proxy = _SparseAttentionKL.apply(q, k, v, q_index, k_index, weights, topk_indices, scale,
                                                  k_scale, kl_value, chunk_size, head_group)
    return out, lse, kl_proxy, kl_value
