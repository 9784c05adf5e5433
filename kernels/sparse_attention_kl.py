"""Triton sparse attention with the sparse indexer KL fused into its backward (docs/design.md, "Indexer losses").

Same signature and semantics as the reference :func:`dsa_dist.ops.sparse_attention_kl.sparse_attention_with_indexer_kl`
(its docstring explains the split of the KL's value from its gradient). The work:

* forward: :func:`kernels.sparse_attention.sparse_attention_fwd` — nothing of the KL; ``kl_proxy`` is 0.
* backward: the attention backward's dq pass recomputes P = exp(S − lse) per (token, head block, key block)
  with the final lse; under ``WRITE_P`` it also stores the column sums of that tile / H, i.e. the KL target
  p_attn [B, Lq, k] (fp32, deterministic), for one extra [BLOCK_H] reduction and a [BLOCK_N] store per tile —
  instead of the unfused KL's second pass over H·d_qk per (query, key). Then the indexer kernels of
  :mod:`kernels.indexer_kl` read p_attn: one pass computes the KL value (written into ``kl_value``) with the
  indexer log-sum-exp, one pass the gradients of q_index, k_index, weights (cost H_I·d_I per (query, key) each).

Under tensor parallelism (``head_group``) the p_attn partials of the ranks' heads are all-reduced (4·B·Lq·k bytes)
and each rank takes its indexer rows ``rank::size``, as in the reference.

The dq pass runs for p_attn even if q needs no gradient. A backward that receives no gradient for ``kl_proxy``
runs the plain attention backward and leaves ``kl_value`` NaN.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels._checks import check_dim, check_indexer_inputs, check_same_batch
from kernels.indexer_kl import indexer_kl_sparse_from_target
from kernels.sparse_attention import _prepare, sparse_attention_bwd, sparse_attention_fwd


def _target_rows(p_local: torch.Tensor, idx: torch.Tensor, head_group: dist.ProcessGroup | None):
    """The all-head p_attn rows ``rank::size`` from this rank's head-mean (the ranks hold equal head counts)."""
    if head_group is None or dist.get_world_size(head_group) == 1:
        return p_local, idx
    rank, size = dist.get_rank(head_group), dist.get_world_size(head_group)
    p_local.div_(size)
    dist.all_reduce(p_local, group=head_group)
    return p_local[:, rank::size].contiguous(), idx[:, rank::size].contiguous()


class _SparseAttentionKL(torch.autograd.Function):
    """Inputs q, k, v, q_index, k_index, weights (differentiable), then the rest; as the reference op."""

    @staticmethod
    def forward(ctx, q, k, v, q_index, k_index, weights, idx, scale, k_scale, kl_value, head_group):
        ctx.set_materialize_grads(False)
        out, lse = sparse_attention_fwd(q, k, v, idx, scale)
        ctx.save_for_backward(q, k, v, q_index, k_index, weights, idx, out, lse, k_scale)
        ctx.scale, ctx.kl_value, ctx.head_group = scale, kl_value, head_group
        ctx.mark_non_differentiable(lse)
        return out, lse, lse.new_zeros(())

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_kl):
        q, k, v, q_index, k_index, weights, idx, out, lse, k_scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        attn_needs = tuple(needs[:3]) if grad_out is not None else (False, False, False)
        p_attn = None if grad_kl is None else torch.empty(idx.shape, device=q.device, dtype=torch.float32)
        dq = dk = dv = None
        if any(attn_needs) or p_attn is not None:
            grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
            dq, dk, dv = sparse_attention_bwd(q, k, v, idx, out, lse, grad_out, ctx.scale, attn_needs,
                                              p_attn=p_attn)  # type: ignore[arg-type]
            dq = dq if attn_needs[0] else None
        if p_attn is None:
            return dq, dk, dv, None, None, None, None, None, None, None, None
        p_rows, idx_rows = _target_rows(p_attn, idx, ctx.head_group)
        kl, dqi, dki, dw = indexer_kl_sparse_from_target(p_rows, q_index, k_index, weights, k_scale, idx_rows,
                                                         grad_kl if any(needs[3:6]) else None)
        ctx.kl_value.copy_(kl)
        cast = [None if g is None or not need else g.to(x.dtype)
                for g, need, x in zip((dqi, dki, dw), needs[3:6], (q_index, k_index, weights))]
        return (dq, dk, dv, *cast, None, None, None, None, None)


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
    indices_checked: bool = False,
    head_group: dist.ProcessGroup | None = None,
    **ignored_kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse attention whose backward also trains the indexer by the sparse KL (Triton).

    Args:
        q, k, v, topk_indices, softmax_scale, indices_checked: as :func:`kernels.sparse_attention.sparse_attention`,
            with ``topk_indices`` [B, Lq, k] shared by all heads.
        q_index: [B, Lq, H_I, d_I], k_index: [B, Lk, d_I], weights: [B, Lq, H_I], k_scale: [B, Lk] or None — the
            indexer inputs, as :func:`kernels.indexer_kl.indexer_kl_loss_sparse` takes them.
        head_group: the group the heads are split over (tensor parallelism), or None; then ``q_index`` and
            ``weights`` hold the rows ``rank::size`` and the backward all-reduces p_attn over the group.
        ignored_kwargs: reference-only options (``chunk_size``), accepted and ignored.

    Returns:
        ``(out [B, Lq, H, d_v], lse [B, Lq, H] fp32, kl_proxy (0-dim, value 0), kl_value (0-dim fp32, the mean
        KL, filled during the backward; NaN before))``.
    """
    idx, scale = _prepare(q, k, v, topk_indices, softmax_scale, indices_checked)
    if topk_indices.dim() != 3:
        raise ValueError(f"topk_indices must be [B, Lq, k] (shared by all heads) for the fused indexer KL, got "
                         f"{tuple(topk_indices.shape)}; per-KV-group indices have no single KL target")
    check_indexer_inputs(q_index, k_index, weights, k_scale)
    check_same_batch("q", q, q_index=q_index, k_index=k_index)
    size = 1 if head_group is None else dist.get_world_size(head_group)
    if q.shape[1] % size:
        raise ValueError(f"the query length {q.shape[1]} must be divisible by the head group's size {size}")
    check_dim("q_index", q_index, 1, q.shape[1] // size, "query rows rank::size of q" if size > 1 else "query length")
    check_dim("k_index", k_index, 1, k.shape[1], "key length, as in k")
    kl_value = torch.full((), float("nan"), dtype=torch.float32, device=q.device)
    out, lse, kl_proxy = _SparseAttentionKL.apply(q, k, v, q_index, k_index, weights, idx.contiguous(), scale,
                                                  k_scale, kl_value, head_group)
    return out, lse, kl_proxy, kl_value


__all__ = ["sparse_attention_with_indexer_kl"]
