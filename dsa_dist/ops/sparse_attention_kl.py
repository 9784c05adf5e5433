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

This is the reference (PyTorch) implementation, the ground truth of the Triton one
(:mod:`kernels.sparse_attention_kl`), which has the same signature; its backward recomputes the reference
attention under autograd and p_attn chunk by chunk (:func:`dsa_dist.ops.kl.sparse_attention_target`).
"""

from __future__ import annotations

import torch

from dsa_dist.ops._checks import check_positive_int
from dsa_dist.ops.indexer import _check_score_inputs
from dsa_dist.ops.kl import indexer_kl_from_target, sparse_attention_target
from dsa_dist.ops.sparse_attention import _check_inputs, sparse_attention


def check_fused_kl_inputs(q: torch.Tensor, topk_indices: torch.Tensor, q_index: torch.Tensor,
                          k_index: torch.Tensor, weights: torch.Tensor, k_scale: torch.Tensor | None,
                          lk: int) -> None:
    """The indexer side of the fused op: [B, Lq, k] indices; q_index/weights rows as q's, k_index keys as k's."""
    if topk_indices.dim() != 3:
        raise ValueError(f"topk_indices must be [B, Lq, k] (shared by all heads) for the fused indexer KL, got "
                         f"{tuple(topk_indices.shape)}; per-KV-group indices have no single KL target")
    _check_score_inputs(q_index, k_index, weights, k_scale)
    b, lq = q.shape[:2]
    if q_index.shape[:2] != (b, lq):
        raise ValueError(f"q_index must be [B={b}, Lq={lq}, H_I, d_I] (the attention's query rows), "
                         f"got {tuple(q_index.shape)}")
    if k_index.shape[:2] != (b, lk):
        raise ValueError(f"k_index must be [B={b}, Lk={lk}, d_I] (the attention's keys), got {tuple(k_index.shape)}")


class _SparseAttentionKL(torch.autograd.Function):
    """Reference fused op: inputs q, k, v, q_index, k_index, weights (differentiable), then the rest."""

    @staticmethod
    def forward(ctx, q, k, v, q_index, k_index, weights, topk_indices, scale, k_scale, kl_value, chunk_size):
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            out, lse = sparse_attention(q, k, v, topk_indices, scale, chunk_size=chunk_size, indices_checked=True)
        ctx.save_for_backward(q, k, v, q_index, k_index, weights, topk_indices, lse, k_scale)
        ctx.scale, ctx.chunk_size, ctx.kl_value = scale, chunk_size, kl_value
        ctx.mark_non_differentiable(lse)
        return out, lse, lse.new_zeros(())

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_kl):
        q, k, v, q_index, k_index, weights, topk, lse, k_scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * 11
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse attention whose backward also trains the indexer by the sparse KL (see the module docstring).

    Args:
        q, k, v, topk_indices, softmax_scale, indices_checked: as :func:`dsa_dist.ops.sparse_attention`, with
            ``topk_indices`` [B, Lq, k] shared by all heads (the KL's selected sets).
        q_index: [B, Lq, H_I, d_I], k_index: [B, Lk, d_I], weights: [B, Lq, H_I], k_scale: [B, Lk] or None — the
            indexer's inputs as :func:`dsa_dist.ops.indexer_kl_loss_sparse` takes them (the model passes the
            FP8-fake-quantised ones); only these receive the KL's gradient.
        chunk_size: query rows per chunk of the reference computation.

    Returns:
        ``(out [B, Lq, H, d_v], lse [B, Lq, H], kl_proxy, kl_value)``: out and lse exactly as
        :func:`~dsa_dist.ops.sparse_attention`; ``kl_proxy`` a 0-dim tensor of value 0 whose gradient is the mean
        sparse KL's; ``kl_value`` a 0-dim float32 tensor filled with the KL value during the backward (NaN before).
    """
    _check_inputs(q, k, v, topk_indices, indices_checked)
    check_fused_kl_inputs(q, topk_indices, q_index, k_index, weights, k_scale, k.shape[1])
    check_positive_int("chunk_size", chunk_size)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    kl_value = torch.full((), float("nan"), dtype=torch.float32, device=q.device)
    out, lse, kl_proxy = _SparseAttentionKL.apply(q, k, v, q_index, k_index, weights, topk_indices, scale,
                                                  k_scale, kl_value, chunk_size)
    return out, lse, kl_proxy, kl_value
