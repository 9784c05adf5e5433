"""One DSA attention step over the decode cache (docs/design.md §1 "GRPO", §2 CP decode).

For new tokens ``[B, n]`` at per-sequence positions (n = 1 in decode), after their keys were written to the cache:

1. **Top-k over the cache** (sparse mode, or when the indices are recorded): the lightning indexer scores each new
   query against the cached FP8 index keys at positions ≤ its own; ties go to the lowest position. The dispatched
   op (Triton kernel on CUDA) takes one position vector per call, so sequences are grouped by their positions:
   one call per distinct prompt length (GRPO's G samples of a prompt share one group). With a cache sharded by
   sequence over CP ranks, :func:`dsa_dist.parallel.candidate_topk` merges every rank's local candidates
   (score, global position) instead of moving keys; every rank gets the same global indices.
2. **Attention**: sparse — the dispatched sparse attention over the selected rows this rank holds; dense — all
   cached rows at positions ≤ the query's. Under CP each rank attends over its own rows and returns its partial
   output and log-sum-exp; the partials are all-gathered and merged exactly (softmax over the union of disjoint key
   sets), the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsa_dist.ops import dispatch
from dsa_dist.ops.topk import INVALID_INDEX
from dsa_dist.rl.kv_cache import CacheLayout, LayerKVCache


@dataclass
class StepPlan:
    """What every layer of one decode step shares, computed once per step (each item would otherwise cost a
    host sync per layer): where the new tokens go, how many cached rows are visible, the position groups."""

    positions: torch.Tensor
    """[B, n] positions of the new tokens."""
    mine: torch.Tensor
    """[B, n] bool: this CP rank stores the new token."""
    write_rows: torch.Tensor
    """[B, n] local row of each new token (meaningful where ``mine``)."""
    rows: int
    """Leading local rows that may be visible to some query (positions ≤ the largest query position)."""
    groups: list[tuple[slice | torch.Tensor, torch.Tensor]]
    """``(batch rows, positions [n])`` of the sequences sharing one position row; the rows are a ``slice`` when
    contiguous (a view of the cache, no copy), else an index tensor."""
    visible: torch.Tensor
    """[B, n, rows] bool: cached row at a position ≤ the query's (dense attention's mask)."""


def plan_step(layout: CacheLayout, positions: torch.Tensor) -> StepPlan:
    """The :class:`StepPlan` of new tokens at ``positions`` [B, n] (each row strictly increasing)."""
    mine, write_rows = layout.locate(positions)
    rows = layout.visible_rows(int(positions.max()))
    unique, inverse = torch.unique(positions, dim=0, return_inverse=True)
    groups = []
    for g in range(unique.shape[0]):
        members = (inverse == g).nonzero().squeeze(1)
        first, last = int(members[0]), int(members[-1])
        contiguous = last - first + 1 == members.numel()
        groups.append((slice(first, last + 1) if contiguous else members, unique[g]))
    visible = layout.positions[:rows][None, None, :] <= positions[:, :, None]
    return StepPlan(positions, mine, write_rows, rows, groups, visible)


def cache_topk(q_index: torch.Tensor, weights: torch.Tensor, cache: LayerKVCache, layout: CacheLayout,
               plan: StepPlan, topk: int, *, cp_group=None) -> torch.Tensor:
    """Top-k global key positions [B, n, k] int32 (−1 empty) of the new queries over the cached index keys.

    Args:
        q_index: [B, n, H_I, d_I] prepared indexer queries (e4m3 with the q scale folded into ``weights``).
        weights: [B, n, H_I] fp32.
    """
    k_all, s_all = cache.index_keys(plan.rows)
    k_pos = layout.positions[: plan.rows]
    if len(plan.groups) > 1:
        out = torch.full((*plan.positions.shape, topk), INVALID_INDEX, dtype=torch.int32, device=q_index.device)
    for members, pos in plan.groups:
        q, w, k = q_index[members], weights[members], k_all[members]
        s = None if s_all is None else s_all[members]
        if layout.cp_size == 1:
            # CP=1: local rows are positions, so the op's row indices are already global positions.
            idx = dispatch.lightning_indexer_topk(q, k, w, topk, s, q_positions=pos, k_positions=k_pos)[1]
        else:
            from dsa_dist.parallel import candidate_topk

            idx = candidate_topk(q, w, k, s, topk, q_positions=pos, k_positions_local=k_pos, group=cp_group)[1]
        if len(plan.groups) == 1:
            return idx
        out[members] = idx
    return out


def cache_attention(q: torch.Tensor, cache: LayerKVCache, layout: CacheLayout, plan: StepPlan,
                    topk_indices: torch.Tensor | None, softmax_scale: float, *, cp_group=None) -> torch.Tensor:
    """Attention of the new queries over the cache: sparse over ``topk_indices`` (global positions [B, n, k]), or
    dense (``topk_indices`` None) over every cached position ≤ the query's.

    Args:
        q: [B, n, H/tp, d_qk] queries (rope applied; MLA absorbed).

    Returns:
        [B, n, H/tp, d_v] output in q's dtype, identical on every CP rank.
    """
    k, v = cache.keys(plan.rows), cache.values(plan.rows)
    if topk_indices is None and layout.cp_size == 1:
        return _sdpa_dense(q, k, v, plan.visible, softmax_scale)
    if topk_indices is None:
        # Dense under CP: every visible local row, as an index list (−1 past the query), so the partial comes
        # with its log-sum-exp for the cross-rank merge.
        local = torch.arange(plan.rows, device=q.device, dtype=torch.int32).expand(plan.visible.shape)
        local = torch.where(plan.visible, local, INVALID_INDEX)
    else:
        local = topk_indices if layout.cp_size == 1 else layout.to_local(topk_indices)
    out, lse = dispatch.sparse_attention(q, k, v, local, softmax_scale)
    if layout.cp_size == 1:
        return out
    return merge_partials(out, lse, cp_group)


def _sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Dense attention of ``q`` [B, n, H, d] over ``k``/``v`` [B, L, Hkv, ·] where ``visible`` [B, n, L].

    Each KV group's query heads become rows of one SDPA head (MQA/GQA without repeating K/V), so torch's fused
    kernels read the cache once per group.
    """
    b, n, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qg = q.reshape(b, n, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, n * g, d)  # rows (token, head)
    if n == 1:  # decode: one mask row per sequence, broadcast over heads (no [B, G, L] copy per layer)
        mask = visible[:, None]  # [B, 1, 1, L]
    else:
        mask = visible[:, None, :, None, :].expand(b, 1, n, g, visible.shape[-1]).reshape(b, 1, n * g, -1)
    o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return o.reshape(b, hkv, n, g, -1).permute(0, 2, 1, 3, 4).reshape(b, n, h, -1)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """Exact softmax attention over the union of the ranks' disjoint key sets from each rank's partial
    ``out`` [B, n, H, d_v] and ``lse`` [B, n, H] (−inf: no key on that rank). Same result on every rank."""
    from dsa_dist.parallel._comm import all_gather_stacked

    dt = torch.promote_types(out.dtype, torch.float32)  # merge in fp32 at least (fp64 stays fp64)
    outs = all_gather_stacked(out.to(dt).contiguous(), group)[0]  # [CP, B, n, H, d_v]
    lses = all_gather_stacked(lse.to(dt).contiguous(), group)[0]  # [CP, B, n, H]
    top = lses.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row with no key anywhere → output 0
    w = torch.exp(lses - top)  # exp(−inf) = 0 for ranks without a key
    total = w.sum(0).clamp_min(torch.finfo(dt).tiny)
    return ((w[..., None] * outs).sum(0) / total[..., None]).to(out.dtype)
