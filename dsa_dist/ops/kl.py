"""Indexer KL losses (docs/design.md, "Indexer losses"), chunked over queries: no [H, L, L] or [L, L] tensor
is ever held.

Dense warm-up:  L_I = Σ_t KL(p[t, :] ‖ softmax(I[t, :])),  p[t, s] = (1/H) Σ_h exp(scale·q_h[t]·k[s] − lse_h[t])
Sparse stage:   L_I = Σ_t KL(p[t, S_t] ‖ softmax(I[t, S_t])) with p and lse from the *sparse* attention.

The target p is rebuilt per query chunk from the attention's per-head log-sum-exp (exactly as a flash-style
kernel streams it) and is always detached: the gradient reaches only ``q_index``, ``k_index`` and ``weights``.
Masked keys contribute nothing; a row with one valid key has zero loss; −inf − (−inf) never happens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from dsa_dist.ops._checks import (
    FLOAT_DTYPES,
    check_dim,
    check_positions,
    check_positive_int,
    check_same_batch,
    check_tensor,
)
from dsa_dist.ops.indexer import _check_score_inputs, _scores_block
from dsa_dist.ops.sparse_attention import _check_inputs as _check_sparse_inputs
from dsa_dist.ops.sparse_attention import gather_rows

Reduction = Literal["mean", "sum", "none"]


def _row_kl(target: torch.Tensor, index_logits: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ softmax(index_logits)) over the last dim; entries with target 0 contribute 0."""
    log_q = torch.log_softmax(index_logits, dim=-1)
    pos = target > 0
    safe_target = torch.where(pos, target, 1.0)
    terms = torch.where(pos, target * (torch.log(safe_target) - torch.where(pos, log_q, 0.0)), 0.0)
    return terms.sum(-1)


def _reduce(per_row: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_attention_lse(lse, q):
    if lse is None:
        return
    check_tensor("attn_lse", lse, ndim=3, dtypes=(torch.float32, torch.float64))
    if lse.shape != q.shape[:3]:
        raise ValueError(f"attn_lse must be [B, Lq, H] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")


def indexer_kl_loss_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    *,
    attn_lse: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    chunk_size: int = 128,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Dense warm-up KL between head-averaged causal attention and the indexer distribution.

    Args:
        q: [B, Lq, H, d] main-attention queries; k: [B, Lk, Hkv, d] keys (both detached here).
        q_index, k_index, weights, k_scale: indexer inputs as for ``lightning_indexer_scores``.
        attn_lse: [B, Lq, H] the dense attention's log-sum-exp (recomputed per chunk if None).
        reduction: over query rows (B·Lq): 'mean' (default), 'sum' or 'none' ([B, Lq]).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    _check_score_inputs(q_index, k_index, weights, k_scale)
    check_same_batch("q", q, k=k, q_index=q_index, k_index=k_index)
    check_positive_int("chunk_size", chunk_size)
    b, lq, h, d = q.shape
    check_dim("k", k, 3, d, "d_qk, as in q")
    check_dim("q_index", q_index, 1, lq, "query length, as in q")
    check_dim("k_index", k_index, 1, k.shape[1], "key length, as in k")
    if h % k.shape[2]:
        raise ValueError(f"q heads ({h}) must be a multiple of k heads ({k.shape[2]})")
    _check_attention_lse(attn_lse, q)
    q_pos = check_positions("q_positions", q_positions, lq, q.device)
    k_pos = check_positions("k_positions", k_positions, k.shape[1], q.device)
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    compute = torch.float64 if q.dtype == torch.float64 or q_index.dtype == torch.float64 else torch.float32
    hkv = k.shape[2]
    k_d = k.detach().to(compute)
    def chunk_kl(start: int, end: int, q_index_c, k_index_, weights_c, k_scale_):
        future = k_pos[None, :] > q_pos[start:end, None]  # [c, Lk]
        with torch.no_grad():
            qc = q[:, start:end].detach().to(compute).reshape(b, end - start, hkv, h // hkv, d)
            logits = torch.einsum("bcgjd,bkgd->bcgjk", qc, k_d).flatten(2, 3) * scale  # [B, c, H, Lk]
            logits = logits.masked_fill(future[None, :, None], float("-inf"))
            lse = torch.logsumexp(logits, -1) if attn_lse is None else attn_lse[:, start:end].to(compute)
            target = torch.exp(logits - lse[..., None]).mean(2)  # [B, c, Lk], L1-normalised over heads
        index_logits = _scores_block(q_index_c, k_index_, weights_c, k_scale_, q_pos[start:end], k_pos, compute)
        return _row_kl(target, index_logits)

    rows = []
    for start in range(0, lq, chunk_size):
        end = min(start + chunk_size, lq)
        # Recompute each chunk in backward: otherwise autograd would keep every chunk's [c, H_I, Lk]
        # intermediates alive at once, i.e. O(H_I · L²) memory after all.
        rows.append(checkpoint(chunk_kl, start, end, q_index[:, start:end], k_index, weights[:, start:end],
                               k_scale, use_reentrant=False))
    return _reduce(torch.cat(rows, 1), reduction)


def indexer_kl_loss_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    topk_indices: torch.Tensor,
    *,
    attn_lse: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    chunk_size: int = 256,
    reduction: Reduction = "mean",
    indices_checked: bool = False,
) -> torch.Tensor:
    """Sparse-stage KL on the selected set S_t only (target from the sparse attention's lse).

    ``topk_indices`` [B, Lq, k] (shared by all heads; −1 = empty). ``attn_lse`` [B, Lq, H] from
    :func:`sparse_attention` (recomputed over S_t if None). ``indices_checked``: the caller guarantees the index
    range (our own top-k, validated replays) and the range check is skipped, as in :func:`sparse_attention`.
    Other arguments as in the dense variant.
    """
    v_dummy = k[..., :1]
    _check_sparse_inputs(q, k, v_dummy, topk_indices, indices_checked)
    if topk_indices.dim() != 3:
        raise ValueError(f"topk_indices must be [B, Lq, k] for the indexer KL, got {tuple(topk_indices.shape)}")
    _check_score_inputs(q_index, k_index, weights, k_scale)
    check_same_batch("q", q, q_index=q_index, k_index=k_index)
    check_dim("q_index", q_index, 1, q.shape[1], "query length, as in q")
    check_dim("k_index", k_index, 1, k.shape[1], "key length, as in k")
    _check_attention_lse(attn_lse, q)
    check_positive_int("chunk_size", chunk_size)
    d = q.shape[-1]
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    compute = torch.float64 if q.dtype == torch.float64 or q_index.dtype == torch.float64 else torch.float32
    k_d = k.detach()

    def chunk_kl(start: int, end: int, q_index_c, k_index_, weights_c, k_scale_):
        idx = topk_indices[:, start:end]  # [B, c, k]
        lse = None if attn_lse is None else attn_lse[:, start:end]
        target = sparse_attention_target(q[:, start:end], k_d, idx, lse, scale, compute)
        index_logits = sparse_index_logits(q_index_c, k_index_, weights_c, k_scale_, idx, compute)
        return _row_kl(target, index_logits)

    rows = []
    for start in range(0, q.shape[1], chunk_size):
        end = min(start + chunk_size, q.shape[1])
        rows.append(checkpoint(chunk_kl, start, end, q_index[:, start:end], k_index, weights[:, start:end],
                               k_scale, use_reentrant=False))
    return _reduce(torch.cat(rows, 1), reduction)


@torch.no_grad()
def sparse_attention_target(q: torch.Tensor, k: torch.Tensor, topk_indices: torch.Tensor,
                            attn_lse: torch.Tensor | None, softmax_scale: float,
                            compute: torch.dtype = torch.float32) -> torch.Tensor:
    """The sparse KL's target p_attn [B, c, k] of one query chunk (detached; 0 on −1 slots and empty rows).

    ``p[t, j] = (1/H) Σ_h exp(scale · q_h[t]·k[idx[t, j]] − lse_h[t])``: the head-mean of the sparse attention's
    probabilities on its selected keys. q [B, c, H, d], k [B, Lk, Hkv, d], topk_indices [B, c, k],
    attn_lse [B, c, H] (recomputed over the set if None).
    """
    b, c, h, d = q.shape
    hkv = k.shape[2]
    valid = topk_indices >= 0
    qc = q.detach().to(compute).reshape(b, c, hkv, h // hkv, d)
    k_sel = gather_rows(k.detach(), topk_indices).to(compute)  # [B, c, k, Hkv, d]
    logits = torch.einsum("bcgjd,bckgd->bcgjk", qc, k_sel).flatten(2, 3) * softmax_scale  # [B, c, H, k]
    logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
    lse = torch.logsumexp(logits, -1) if attn_lse is None else attn_lse.to(compute)
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    return torch.exp(logits - lse[..., None]).mean(2)  # [B, c, k]


def sparse_index_logits(q_index: torch.Tensor, k_index: torch.Tensor, weights: torch.Tensor,
                        k_scale: torch.Tensor | None, topk_indices: torch.Tensor,
                        compute: torch.dtype = torch.float32) -> torch.Tensor:
    """Indexer logits I [B, c, k] of one query chunk at its selected keys (differentiable in the indexer inputs).

    −inf on −1 slots; a row with no valid slot gets 0 everywhere (its target is 0, so log_softmax stays defined).
    q_index [B, c, H_I, d_I], k_index [B, Lk, d_I], weights [B, c, H_I], k_scale [B, Lk] or None.
    """
    valid = topk_indices >= 0
    k_index_sel = gather_rows(k_index, topk_indices).to(compute)  # [B, c, k, d_I]
    relu = torch.relu(torch.einsum("bchd,bckd->bchk", q_index.to(compute), k_index_sel))
    index_logits = torch.einsum("bchk,bch->bck", relu, weights.to(compute))
    if k_scale is not None:
        index_logits = index_logits * gather_rows(k_scale, topk_indices).to(compute)
    index_logits = index_logits.masked_fill(~valid, float("-inf"))
    return torch.where(valid.any(-1, keepdim=True), index_logits, 0.0)


def indexer_kl_from_target(
    target: torch.Tensor,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    topk_indices: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Mean over the B·Lq rows of KL(target ‖ softmax(I)) on the selected slots, for a given ``target``.

    ``target`` [B, Lq, k]: p_attn as :func:`sparse_attention_target` builds it (e.g. summed from the attention
    backward's P tiles); detached. Differentiable in ``q_index``, ``k_index``, ``weights``; equal to
    :func:`indexer_kl_loss_sparse` (reduction 'mean') when ``target`` is that loss's target.
    """
    compute = torch.float64 if torch.float64 in (target.dtype, q_index.dtype) else torch.float32
    target = target.detach().to(compute)
    rows = []
    for start in range(0, target.shape[1], chunk_size):
        end = min(start + chunk_size, target.shape[1])

        def chunk_kl(q_index_c, k_index_, weights_c, k_scale_, start=start, end=end):
            logits = sparse_index_logits(q_index_c, k_index_, weights_c, k_scale_, topk_indices[:, start:end], compute)
            return _row_kl(target[:, start:end], logits)

        rows.append(checkpoint(chunk_kl, q_index[:, start:end], k_index, weights[:, start:end], k_scale,
                               use_reentrant=False))
    return torch.cat(rows, 1).mean()
