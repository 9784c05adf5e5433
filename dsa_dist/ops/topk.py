"""Deterministic causal top-k over lightning-indexer scores (docs/design.md, "Top-k").

Rules every implementation (Triton kernel, CP merge, decode) must match exactly:
- keys are ranked by score descending; **ties go to the lowest key index**, so every TP/CP rank picks one set;
- slots with no valid key (row has fewer than k causal keys) hold index −1 and score −inf; a NaN score (from a
  NaN/inf in the inputs) is no valid key, so an index is always −1 or a real key row;
- the full [L, L] score matrix is never held: scores are built and reduced one query chunk at a time.
Returned indices are ``int32`` row indices into the key tensor, ordered by (score desc, index asc).
"""

from __future__ import annotations

import torch

from dsa_dist.ops._checks import check_positions, check_positive_int, check_query_positions, check_tensor
from dsa_dist.ops.indexer import _check_score_inputs, _scores_block

INVALID_INDEX = -1


def topk_from_scores(
    scores: torch.Tensor, topk: int, key_indices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``scores`` [..., N] with lowest-index tie-breaking; −inf and NaN entries are invalid.

    ``key_indices`` [..., N] (int) names each column's key (default: the column number); entries < 0 are
    invalid. Used both for a score row block and for merging per-shard candidates. Returns
    ``(values [..., k] float, indices [..., k] int32)``; when fewer than k entries are valid the tail is
    (−inf, −1).
    """
    check_tensor("scores", scores)
    check_positive_int("topk", topk)
    n = scores.shape[-1]
    monotone = key_indices is None
    if key_indices is None:
        key_indices = torch.arange(n, device=scores.device).expand(scores.shape)
    elif key_indices.shape != scores.shape:
        raise ValueError(f"key_indices must match scores' shape {tuple(scores.shape)}, got {tuple(key_indices.shape)}")
    key_indices = key_indices.long()
    invalid = (key_indices < 0) | torch.isneginf(scores) | torch.isnan(scores)
    scores = scores.masked_fill(invalid, float("-inf"))
    k_eff = min(topk, n)
    if monotone:
        values, indices = _topk_ascending_columns(scores, k_eff)
        indices = key_indices.gather(-1, indices)
    else:
        # Candidate lists are in no particular key order: sort by key index first, then a *stable* sort by
        # score keeps equal scores in ascending key order. N is small here (CP · k candidates).
        by_index = torch.sort(key_indices.masked_fill(invalid, torch.iinfo(torch.int64).max), dim=-1, stable=True)
        scores_by_index = scores.gather(-1, by_index.indices)
        order = torch.sort(scores_by_index, dim=-1, descending=True, stable=True).indices[..., :k_eff]
        values = scores_by_index.gather(-1, order)
        indices = by_index.values.gather(-1, order)
    indices = indices.masked_fill(torch.isneginf(values), INVALID_INDEX)
    if k_eff < topk:
        pad = topk - k_eff
        values = torch.nn.functional.pad(values, (0, pad), value=float("-inf"))
        indices = torch.nn.functional.pad(indices, (0, pad), value=INVALID_INDEX)
    return values, indices.to(torch.int32)


def _topk_ascending_columns(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k when column order is key order, in O(N) extra memory per row (no full sort).

    ``torch.topk`` does not promise which of several equal scores it keeps, so it only supplies the k-th value:
    every score above it is taken, and of those equal to it the lowest columns fill the remaining slots.
    """
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    above = scores > kth
    at_kth = scores == kth
    need = k - above.sum(-1, keepdim=True)
    selected = above | (at_kth & (at_kth.cumsum(-1) <= need))  # exactly k per row
    columns = torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape)
    picked = torch.where(selected, columns, scores.shape[-1]).topk(k, dim=-1, largest=False, sorted=True).values
    values = scores.gather(-1, picked)
    # picked is in ascending column order, so a stable descending sort gives (score desc, index asc)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), picked.gather(-1, order)


def lightning_indexer_topk(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    k_scale: torch.Tensor | None = None,
    *,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal top-k keys of every query, scored by the lightning indexer, in query chunks.

    Args:
        q_index: [B, Lq, H_I, d_I] (bf16/fp32, or e4m3 with the q scale folded into ``weights``).
        k_index: [B, Lk, d_I] one index key per token.
        weights: [B, Lq, H_I] per-head weights.
        topk: k (> 0). May exceed Lk: the tail is padded with −1.
        k_scale: [B, Lk] per-key FP8 scale, or None.
        q_positions / k_positions: [Lq] / [Lk] global positions for the causal rule (default arange);
            ``q_positions`` may also be [B, Lq], one row per sequence (decode: each sequence at its own position).
        chunk_size: queries scored at once; peak memory is O(chunk_size · H_I · Lk).

    Returns:
        ``(topk_scores [B, Lq, k] float32, topk_indices [B, Lq, k] int32)`` — indices are rows of ``k_index``.
    """
    _check_score_inputs(q_index, k_index, weights, k_scale)
    check_positive_int("topk", topk)
    check_positive_int("chunk_size", chunk_size)
    b, lq = q_index.shape[:2]
    q_pos = check_query_positions("q_positions", q_positions, b, lq, q_index.device)
    k_pos = check_positions("k_positions", k_positions, k_index.shape[1], k_index.device)
    out_scores = torch.empty(b, lq, topk, dtype=torch.float32, device=q_index.device)
    out_indices = torch.empty(b, lq, topk, dtype=torch.int32, device=q_index.device)
    with torch.no_grad():
        for start in range(0, lq, chunk_size):
            end = min(start + chunk_size, lq)
            block = _scores_block(
                q_index[:, start:end], k_index, weights[:, start:end], k_scale,
                q_pos[..., start:end], k_pos, torch.float32,
            )  # [B, c, Lk]
            out_scores[:, start:end], out_indices[:, start:end] = topk_from_scores(block, topk)
    return out_scores, out_indices
