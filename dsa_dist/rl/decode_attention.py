"""One DSA attention step over the decode cache (docs/design.md §1 "GRPO", §2 CP decode).

For new tokens ``[B, n]`` at per-sequence positions (n = 1 in decode), after their keys were written to the cache:

1. **Top-k over the cache** (sparse mode, or when the indices are recorded): the lightning indexer scores each new
   query against the cached FP8 index keys at positions ≤ its own; ties go to the lowest position. One call of the
   dispatched op (the Triton kernel on CUDA) serves the whole batch: it takes one query-position row per sequence,
   so sequences at different positions (prompts of different lengths) need no grouping, and nothing about the
   step depends on tensor values read back on the host. With a cache sharded by sequence over CP ranks,
   :func:`dsa_dist.parallel.candidate_topk` merges every rank's local candidates (score, global position) instead
   of moving keys; every rank gets the same global indices.
2. **Attention**: sparse — the dispatched sparse attention over the selected rows this rank holds; dense — all
   cached rows at positions ≤ the query's, by PyTorch's fused SDPA or split-KV through the sparse kernel (CP = 1,
   ``dense_kernel``; the engine picks split on CUDA). Under CP each rank attends over its
   own rows and returns its partial output and log-sum-exp; the partials are all-gathered and merged exactly
   (softmax over the union of disjoint key sets), the same on every rank.

No host synchronisation: every shape of a step is known on the host — the rows read are the whole cache, or the
prefix up to the caller's host-side bound ``max_position`` (:func:`plan_step`) — and value checks run on the
device (:func:`dsa_dist.ops._checks.assert_on_device`).

Decode parallelism (Lq = 1): the sparse attention kernel runs one program per (token, KV group, head block), i.e.
about B programs at decode, each reading k cached rows. On CUDA a small batch therefore splits the k selected
slots into up to ``k / 64`` groups, run as extra "queries" of one kernel call and merged by their log-sum-exp
(:func:`split_sparse_attention`), so that B ≤ 64 sequences still spread over the SMs. The indexer kernel splits
its own key range (kernels/indexer_topk.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsa_dist.ops import dispatch
from dsa_dist.ops._checks import assert_on_device
from dsa_dist.ops.topk import INVALID_INDEX
from dsa_dist.rl.kv_cache import CacheLayout, LayerKVCache

SPLIT_SLOTS = 64  # selected slots per program at least, when a small decode batch splits its sparse attention


@dataclass
class StepPlan:
    """What every layer of one decode step shares, computed once per step on the device (no host sync)."""

    positions: torch.Tensor
    """[B, n] positions of the new tokens."""
    mine: torch.Tensor
    """[B, n] bool: this CP rank stores the new token."""
    write_rows: torch.Tensor
    """[B, n] local row of each new token (meaningful where ``mine``)."""
    rows: int
    """Leading local rows read by the step: all of them, or those at positions ≤ the caller's ``max_position``."""
    visible: torch.Tensor
    """[B, n, rows] bool: cached row at a position ≤ the query's (dense attention's mask)."""


def plan_step(layout: CacheLayout, positions: torch.Tensor, max_position: int | None = None) -> StepPlan:
    """The :class:`StepPlan` of new tokens at ``positions`` [B, n] (each row strictly increasing).

    ``max_position``: a host-side upper bound on ``positions`` (rollout generation knows it: the longest prompt
    plus the step). The step then reads only the local rows up to it; without it, every row of the cache (rows
    past a query's position are masked, so the result is the same). The bound is checked on the device.
    """
    mine, write_rows = layout.locate(positions)
    rows = layout.rows
    if max_position is not None:
        if isinstance(max_position, bool) or not isinstance(max_position, int):
            raise ValueError(f"max_position must be a host int (an upper bound on the positions), got "
                             f"{type(max_position).__name__}")
        rows = min(layout.visible_rows(max_position), layout.rows)
        if positions.numel():
            top = positions.max()
            assert_on_device(top <= max_position, lambda: f"max_position={max_position} is below the largest "
                                                           f"position of the step ({int(top)}); pass a true bound")
    visible = layout.positions[:rows][None, None, :] <= positions[:, :, None]
    return StepPlan(positions, mine, write_rows, rows, visible)


def cache_topk(q_index: torch.Tensor, weights: torch.Tensor, cache: LayerKVCache, layout: CacheLayout,
               plan: StepPlan, topk: int, *, cp_group=None) -> torch.Tensor:
    """Top-k global key positions [B, n, k] int32 (−1 empty) of the new queries over the cached index keys.

    Args:
        q_index: [B, n, H_I, d_I] prepared indexer queries (e4m3 with the q scale folded into ``weights``).
        weights: [B, n, H_I] fp32.
    """
    k_all, s_all = cache.index_keys(plan.rows)
    k_pos = layout.positions[: plan.rows]
    if layout.cp_size == 1:
        # CP=1: local rows are positions, so the op's row indices are already global positions.
        return dispatch.lightning_indexer_topk(q_index, k_all, weights, topk, s_all, q_positions=plan.positions,
                                               k_positions=k_pos)[1]
    from dsa_dist.parallel import candidate_topk

    return candidate_topk(q_index, weights, k_all, s_all, topk, q_positions=plan.positions, k_positions_local=k_pos,
                          group=cp_group)[1]


def cache_attention(q: torch.Tensor, cache: LayerKVCache, layout: CacheLayout, plan: StepPlan,
                    topk_indices: torch.Tensor | None, softmax_scale: float, *, cp_group=None,
                    dense_kernel: str = "sdpa") -> torch.Tensor:
    """Attention of the new queries over the cache: sparse over ``topk_indices`` (global positions [B, n, k]), or
    dense (``topk_indices`` None) over every cached position ≤ the query's.

    Args:
        q: [B, n, H/tp, d_qk] queries (rope applied; MLA absorbed).
        dense_kernel: dense attention with CP = 1 through ``"sdpa"`` (PyTorch's fused SDPA, :func:`sdpa_dense`)
            or ``"split"``: the sparse attention kernel over every visible row, its slots split into groups that
            fill the GPU and merged by log-sum-exp (split-KV "flash decoding"; what CP > 1 always uses). The
            memory-efficient SDPA kernel runs one program per sequence over the whole cache, so at long caches
            ``"split"`` is the faster dense decode (benchmarks/decode.py times both).

    Returns:
        [B, n, H/tp, d_v] output in q's dtype, identical on every CP rank.
    """
    if dense_kernel not in ("sdpa", "split"):
        raise ValueError(f"dense_kernel must be 'sdpa' or 'split', got {dense_kernel!r}")
    k, v = cache.keys(plan.rows), cache.values(plan.rows)
    if topk_indices is None and layout.cp_size == 1 and dense_kernel == "sdpa":
        return sdpa_dense(q, k, v, plan.visible, softmax_scale)
    if topk_indices is None:
        # Dense under CP (or split): every visible local row, as an index list (−1 past the query), so the
        # partial comes with its log-sum-exp for the cross-rank merge.
        local = torch.arange(plan.rows, device=q.device, dtype=torch.int32).expand(plan.visible.shape)
        local = torch.where(plan.visible, local, INVALID_INDEX)
    else:
        local = topk_indices if layout.cp_size == 1 else layout.to_local(topk_indices)
    out, lse = split_sparse_attention(q, k, v, local, softmax_scale, splits=attention_splits(q, local))
    if layout.cp_size == 1:
        return out
    return merge_partials(out, lse, cp_group)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def attention_splits(q: torch.Tensor, indices: torch.Tensor) -> int:
    """Slot groups for :func:`split_sparse_attention`: 1 off CUDA or when B·n·Hkv programs already fill the
    GPU (two per SM), else enough groups of a multiple of :data:`SPLIT_SLOTS` selected slots to do so (small
    preset, k = 512: 8 groups of 64 at B = 1, 4 of 128 at B = 64)."""
    if q.device.type != "cuda":
        return 1
    programs = q.shape[0] * q.shape[1] * (indices.shape[2] if indices.dim() == 4 else 1)
    target = 2 * _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    slots = indices.shape[-1]
    splits = max(1, min(-(-target // programs), slots // SPLIT_SLOTS))
    per = _ceil_div(_ceil_div(slots, splits), SPLIT_SLOTS) * SPLIT_SLOTS  # whole multiples of SPLIT_SLOTS
    return _ceil_div(slots, per)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def split_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                           scale: float, *, splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dsa_dist.ops.dispatch.sparse_attention` with each query's selected slots cut into ``splits`` groups.

    The groups are attended as separate queries of one call (q repeated, ``[B, n·splits, k / splits]`` indices)
    and merged exactly by their log-sum-exp (:func:`combine_partials`): more programs for the kernel at
    decode, the same ``(out [B, n, H, d_v], lse [B, n, H])``.
    """
    if splits <= 1:
        return dispatch.sparse_attention(q, k, v, indices, scale, indices_checked=True)
    b, n, h, d = q.shape
    slots = indices.shape[-1]
    per = -(-slots // splits)
    pad = per * splits - slots
    if pad:
        indices = F.pad(indices, (0, pad), value=INVALID_INDEX)
    if indices.dim() == 4:  # [B, n, Hkv, k] → [B, n, splits, Hkv, per]
        grouped = indices.unflatten(-1, (splits, per)).transpose(2, 3).reshape(b, n * splits, indices.shape[2], per)
    else:
        grouped = indices.reshape(b, n * splits, per)
    qs = q[:, :, None].expand(b, n, splits, h, d).reshape(b, n * splits, h, d)
    out, lse = dispatch.sparse_attention(qs, k, v, grouped.contiguous(), scale, indices_checked=True)
    return combine_partials(out.unflatten(1, (n, splits)), lse.unflatten(1, (n, splits)), dim=2)


def combine_partials(outs: torch.Tensor, lses: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of disjoint key sets from partial outputs ``outs`` [..., S, ..., H, d_v]
    and log-sum-exps ``lses`` (−inf: no key in that part) stacked along ``dim``; returns ``(out, lse)`` without
    ``dim`` — out in ``outs``' dtype (merged in fp32 at least), lse −inf and out 0 where no part had a key."""
    dt = torch.promote_types(outs.dtype, torch.float32)
    lses = lses.to(dt)
    top = lses.amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row with no key anywhere → output 0
    w = torch.exp(lses - top)  # exp(−inf) = 0 for parts without a key
    total = w.sum(dim)
    out = (w.unsqueeze(-1) * outs.to(dt)).sum(dim) / total.clamp_min(torch.finfo(dt).tiny).unsqueeze(-1)
    return out.to(outs.dtype), torch.log(total) + top.squeeze(dim)


def sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Dense attention of ``q`` [B, n, H, d] over ``k``/``v`` [B, L, Hkv, ·] where ``visible`` [B, n, L].

    PyTorch's fused SDPA (on CUDA the memory-efficient kernel: MLA's 576/512 or 288/256 head dims rule out flash
    and cuDNN) with each sequence's causal limit as a boolean mask. Each KV group's query heads become rows of one
    SDPA head (MQA/GQA without repeating K/V), so the kernel reads the cache once per group.
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
    return combine_partials(outs, lses, dim=0)[0].to(out.dtype)
