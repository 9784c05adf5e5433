"""Distributed lightning-indexer top-k over a sequence sharded across CP ranks (docs/design.md#context-parallelism).

Exactness argument used by every mode: the top-k order is the total order (score desc, global index asc).
Every member of the global top-k is also in the top-k of the shard that holds it, so merging the per-shard
top-k candidate lists with :func:`dsa_dist.ops.topk_from_scores` (``key_indices`` = global indices) gives the
exact single-rank result, ties and −1 padding included — provided each shard's local tie-break (lowest local
row) agrees with the global one, i.e. global indices increase with the local row. Zigzag shards (two chunks in
ascending order) satisfy that by construction.

Modes of :func:`distributed_indexer_topk` (training; each rank scores its own queries):
- ``"allgather"``: all-gather the FP8 index keys + scales (d_I + 4 bytes/token), reorder to global order, one
  top-k over all keys.
- ``"ring"``: pass key shards around the ring with ``batch_isend_irecv``; score the shard in hand while the
  next one is in flight; merge per-shard candidates as they come.
- ``"candidates"``: all-gather the *queries*; each rank scores every query against its own key shard and sends
  each owner its candidates (all-to-all of k × (score, index) per query); owners merge.
:func:`candidate_topk` is the decode form: all ranks share the queries and hold one KV-cache shard each; local
candidates are all-gathered and merged identically on every rank.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.distributed as dist

from dsa_dist.ops._checks import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    assert_on_device,
    check_positive_int,
    check_query_positions,
    check_tensor,
)
from dsa_dist.ops.indexer import _check_score_inputs
from dsa_dist.ops.topk import INVALID_INDEX, topk_from_scores
from dsa_dist.parallel._comm import (
    all_gather_stacked,
    all_to_all_stacked,
    group_size_rank,
    ring_shift,
    to_wire,
)
from dsa_dist.parallel.sharding import check_cp_config, rank_major_to_global, zigzag_positions

# Temporaries of one candidate merge are bounded by this budget: a merge sorts (score, index) pairs of every row
# by index and by score in int64/fp32 (measured ~24 bytes per candidate on CPU; budgeted at 40). Unchunked, merging
# 2k = 4096 candidates for 128K rows (V3.2 at 512K tokens on 4 ranks) holds ~12 GiB of temporaries at once, three
# times the top-k's own buffers (docs/context_parallel.md "Memory per rank"). Rows are merged in chunks instead.
MERGE_BUDGET_BYTES = 512 * 2**20
_MERGE_BYTES_PER_CANDIDATE = 40

TopkMode = Literal["allgather", "ring", "candidates"]
TOPK_MODES: tuple[str, ...] = ("allgather", "ring", "candidates")


def _local_topk(q, k, w, topk, k_scale, *, q_positions, k_positions, chunk_size):
    """Single-device top-k through the op dispatch (Triton kernel on CUDA, reference elsewhere)."""
    from dsa_dist.ops import dispatch  # imported on use: keeps this module importable on its own

    # chunk_size None lets the op choose (the Triton kernel sizes its chunk to a workspace budget).
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    return dispatch.lightning_indexer_topk(q, k, w, topk, k_scale, q_positions=q_positions, k_positions=k_positions,
                                           **extra)


@functools.lru_cache(maxsize=64)
def _zigzag_rows(seq_len: int, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Global rows of every rank's zigzag shard, built once per (length, CP size, device): at small shards a CP
    step is bound by host-side launches (docs/context_parallel.md, measured), so the 3·CP small launches that
    build these every layer are not repeated. The tensors are shared: read only."""
    with torch.inference_mode(False):  # normal tensors even when first built in inference mode (rollouts)
        return tuple(zigzag_positions(seq_len, size, j, device=device) for j in range(size))


def _to_global(local_idx: torch.Tensor, global_rows: torch.Tensor) -> torch.Tensor:
    """Map int32 local rows (−1 = empty) to int32 global indices via ``global_rows`` [Lk]."""
    mapped = global_rows[local_idx.clamp_min(0).long()].to(torch.int32)
    return torch.where(local_idx >= 0, mapped, INVALID_INDEX)


def merge_chunk_rows(candidates_per_row: int, budget_bytes: int | None = None) -> int:
    """Rows merged at once so that one merge's temporaries stay within ``budget_bytes`` (default
    :data:`MERGE_BUDGET_BYTES`)."""
    budget = MERGE_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (candidates_per_row * _MERGE_BYTES_PER_CANDIDATE))


def _merge_shard(best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, local_idx: torch.Tensor,
                 global_rows: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one shard's candidates ``(scores, local rows)`` [B, Lq, k] into ``best`` (scores, global indices),
    exactly, row chunk by row chunk (bounded temporaries); ``best``'s tensors are updated in place."""
    local_idx = local_idx.contiguous()
    flat_new = local_idx.view(-1, local_idx.shape[-1])
    step = merge_chunk_rows(2 * topk)
    if best is None:  # the first shard: only map its rows to global indices (in place, int32)
        for r in range(0, flat_new.shape[0], step):
            flat_new[r:r + step] = _to_global(flat_new[r:r + step], global_rows)
        return scores, local_idx
    best_s, best_i = best[0].contiguous(), best[1].contiguous()
    bs, bi = best_s.view(-1, topk), best_i.view(-1, topk)
    ns = scores.reshape(-1, scores.shape[-1])
    for r in range(0, bs.shape[0], step):
        rows = slice(r, r + step)
        v, i = topk_from_scores(torch.cat([bs[rows], ns[rows]], -1), topk,
                                key_indices=torch.cat([bi[rows], _to_global(flat_new[rows], global_rows)], -1))
        bs[rows], bi[rows] = v, i
    return best_s, best_i


def _pack_keys(k_index: torch.Tensor, k_scale: torch.Tensor | None) -> torch.Tensor:
    """One uint8 buffer [B, Lk, bytes] per shard: key bytes (FP8: d_I) followed by the fp32 scale (4)."""
    parts = [to_wire(k_index).view(torch.uint8)]
    if k_scale is not None:
        parts.append(k_scale.float().contiguous().unsqueeze(-1).view(torch.uint8))
    return torch.cat(parts, -1)


def _unpack_keys(buf: torch.Tensor, dtype: torch.dtype, d: int, has_scale: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    nbytes = d * torch.empty((), dtype=dtype).element_size()
    k = buf[..., :nbytes].contiguous().view(dtype)
    scale = buf[..., nbytes:].contiguous().view(torch.float32).squeeze(-1) if has_scale else None
    return k, scale


class PendingIndexKeys:
    """The index keys (+ scales) of every CP rank in flight: start the exchange as soon as this rank's keys exist
    (:func:`start_index_key_gather`), do other work, then pass it to :func:`distributed_indexer_topk`
    (``prefetched_keys``, ``"allgather"`` mode), which waits for it right before scoring."""

    def __init__(self, k_index_local: torch.Tensor, k_scale_local: torch.Tensor | None,
                 group: dist.ProcessGroup | None) -> None:
        self.k_index_local, self.k_scale_local, self.group = k_index_local, k_scale_local, group
        self._stacked, self._work = all_gather_stacked(_pack_keys(k_index_local, k_scale_local), group,
                                                       async_op=True)

    def wait(self) -> torch.Tensor:
        """Every rank's packed keys [CP, B, Lk, bytes] (rank-major)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._stacked


def start_index_key_gather(k_index_local: torch.Tensor, k_scale_local: torch.Tensor | None,
                           group: dist.ProcessGroup | None = None) -> PendingIndexKeys:
    """Start all-gathering this rank's index keys [B, Lk, d_I] (FP8 travels as bytes) and scales [B, Lk] over
    ``group``; hand the result to ``distributed_indexer_topk(..., prefetched_keys=...)`` with the same tensors."""
    check_tensor("k_index_local", k_index_local, ndim=3, dtypes=FLOAT_DTYPES + FP8_DTYPES)
    if k_scale_local is not None and k_scale_local.shape != k_index_local.shape[:2]:
        raise ValueError(f"k_scale_local must have shape {tuple(k_index_local.shape[:2])}, got "
                         f"{tuple(k_scale_local.shape)}")
    return PendingIndexKeys(k_index_local, k_scale_local, group)


def _check_monotone(name: str, rows: torch.Tensor) -> None:
    # The shard's local tie-break (lowest row) must agree with the global one (lowest global index). Checked on
    # the device: CUDA queues an assertion (no host sync), CPU raises ValueError now.
    if rows.numel() > 1:
        assert_on_device((rows[1:] > rows[:-1]).all(),
                         lambda: f"{name} must be strictly increasing along the shard (ties break by lowest index)")


def _positions(name: str, positions: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    if positions is None:
        return default
    check_tensor(name, positions, ndim=1, dtypes=(torch.int32, torch.int64))
    if positions.shape != default.shape:
        raise ValueError(f"{name} must have shape {tuple(default.shape)}, got {tuple(positions.shape)}")
    if positions.device != default.device:
        raise ValueError(f"{name} is on {positions.device}, expected {default.device}")
    return positions.long()


def distributed_indexer_topk(
    q_index: torch.Tensor,
    weights: torch.Tensor,
    k_index_local: torch.Tensor,
    k_scale_local: torch.Tensor | None,
    topk: int,
    *,
    q_positions: torch.Tensor | None = None,
    k_positions_local: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    mode: TopkMode = "ring",
    chunk_size: int | None = None,
    prefetched_keys: PendingIndexKeys | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal top-k of this rank's queries over the keys of all CP ranks (zigzag-sharded sequence).

    Args:
        q_index: [B, Lq, H_I, d_I] this rank's indexer queries (e4m3 with the q scale in ``weights``, or float).
        weights: [B, Lq, H_I] per-head weights.
        k_index_local: [B, Lk, d_I] this rank's index keys (e4m3 or float), Lk = L / CP. The queries may be a
            subset of this rank's tokens (e.g. the rows one TP rank scores) when ``q_positions`` is given.
        k_scale_local: [B, Lk] fp32 per-key scale, or None.
        topk: k. Rows with fewer than k causal keys are padded with (−inf, −1).
        q_positions / k_positions_local: [Lq] / [Lk] positions for the causal rule; default (None) is the zigzag
            positions of this rank. Explicit key positions are all-gathered (8 bytes/token, once per call).
        group: the CP group (Megatron: ``parallel_state.get_context_parallel_group()``); None = world.
        mode: "allgather", "ring" (default) or "candidates" — see the module docstring; all return the same.
        chunk_size: query chunk of the local scoring, passed to the dispatched top-k (None: the op's default).
        prefetched_keys: ``"allgather"`` mode: the key exchange already started by
            :func:`start_index_key_gather` on ``k_index_local`` / ``k_scale_local`` (it overlapped whatever ran
            since); None: the keys are gathered here.

    Returns:
        ``(topk_scores [B, Lq, k] float32, topk_indices [B, Lq, k] int32)``; indices are **global** rows, i.e.
        rows of ``all_gather_sequence(kv, 1, group)``, ordered (score desc, index asc).
    """
    _check_score_inputs(q_index, k_index_local, weights, k_scale_local)
    check_positive_int("topk", topk)
    if mode not in TOPK_MODES:
        raise ValueError(f"mode must be one of {TOPK_MODES}, got {mode!r}")
    if prefetched_keys is not None:
        if mode != "allgather":
            raise ValueError(f"prefetched_keys is for mode='allgather' (the keys are all-gathered); mode={mode!r} "
                             "exchanges them itself: pass prefetched_keys=None")
        if prefetched_keys.k_index_local is not k_index_local or prefetched_keys.k_scale_local is not k_scale_local:
            raise ValueError("prefetched_keys was started on other tensors than k_index_local / k_scale_local: "
                             "start it with start_index_key_gather(k_index_local, k_scale_local, group)")
        if prefetched_keys.group is not group:
            raise ValueError("prefetched_keys was started on another process group than group")
    size, rank = group_size_rank(group)
    lq, lk = q_index.shape[1], k_index_local.shape[1]
    if q_positions is None and lq != lk:
        raise ValueError(f"q_positions is required when the queries are not this rank's whole shard (Lq={lq}, Lk={lk})")
    check_cp_config(lk * size, size)
    device = q_index.device
    # rows[j]: global rows of rank j's shard, which is also its default positions.
    rows = _zigzag_rows(lk * size, size, device)
    q_pos = _positions("q_positions", q_positions, rows[rank] if lq == lk else torch.empty(lq, device=device))
    k_pos_local = _positions("k_positions_local", k_positions_local, rows[rank])
    if size == 1:
        return _local_topk(q_index, k_index_local, weights, topk, k_scale_local, q_positions=q_pos,
                           k_positions=k_pos_local, chunk_size=chunk_size)
    if k_positions_local is None:
        k_pos = rows
    else:  # (a caller whose keys sit at the default positions passes None and spares this collective)
        stacked, _ = all_gather_stacked(k_pos_local, group)
        k_pos = list(stacked.unbind(0))
    if mode == "allgather":
        return _allgather_topk(q_index, weights, k_index_local, k_scale_local, topk, q_pos, k_pos, group,
                               size, chunk_size, prefetched_keys)
    if mode == "ring":
        return _ring_topk(q_index, weights, k_index_local, k_scale_local, topk, q_pos, k_pos, rows, group,
                          size, rank, chunk_size)
    return _candidates_topk(q_index, weights, k_index_local, k_scale_local, topk, q_pos, k_pos_local,
                            rows[rank], group, size, chunk_size)


def _allgather_topk(q, w, k_local, s_local, topk, q_pos, k_pos, group, size, chunk_size, prefetched):
    d = k_local.shape[-1]
    if prefetched is None:
        prefetched = PendingIndexKeys(k_local, s_local, group)
    stacked = prefetched.wait()  # [CP, B, Lk, bytes]
    full = rank_major_to_global(stacked.movedim(0, 1).flatten(1, 2), 1, size)  # [B, L, bytes], global order
    k_full, s_full = _unpack_keys(full, k_local.dtype, d, s_local is not None)
    pos_full = rank_major_to_global(torch.cat(k_pos), 0, size)
    # Keys are in global order, so the local rows of this top-k are the global indices.
    return _local_topk(q, k_full, w, topk, s_full, q_positions=q_pos, k_positions=pos_full, chunk_size=chunk_size)


def _ring_topk(q, w, k_local, s_local, topk, q_pos, k_pos, rows, group, size, rank, chunk_size):
    d = k_local.shape[-1]
    cur = _pack_keys(k_local, s_local)
    nxt = torch.empty_like(cur)
    best = None
    for step in range(size):
        src = (rank - step) % size  # owner of the shard in hand
        # Start moving the shard in hand to the next rank before scoring it: the transfer overlaps the scoring
        # (NCCL runs it on its own stream; gloo on its own thread).
        reqs = ring_shift(cur, nxt, group) if step < size - 1 else []
        k, s = _unpack_keys(cur, k_local.dtype, d, s_local is not None)
        scores, local_idx = _local_topk(q, k, w, topk, s, q_positions=q_pos, k_positions=k_pos[src],
                                        chunk_size=chunk_size)
        best = _merge_shard(best, scores, local_idx, rows[src], topk)
        for req in reqs:
            req.wait()
        cur, nxt = nxt, cur
    return best


def _candidates_topk(q, w, k_local, s_local, topk, q_pos, k_pos_local, rows_local, group, size, chunk_size):
    lq = q.shape[1]
    # Gather every rank's queries (rank-major: [B, CP·Lq, ...]); no reorder needed, results go back to owners.
    q_all = all_gather_stacked(q, group)[0].movedim(0, 1).flatten(1, 2)
    w_all = all_gather_stacked(w.float(), group)[0].movedim(0, 1).flatten(1, 2)
    q_pos_all = all_gather_stacked(q_pos, group)[0].flatten()
    scores, local_idx = _local_topk(q_all, k_local, w_all, topk, s_local, q_positions=q_pos_all,
                                    k_positions=k_pos_local, chunk_size=chunk_size)
    return _exchange_and_merge(scores, _to_global(local_idx, rows_local), topk, group, size, lq, all_to_all=True)


def _pack_candidates(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(fp32 score, int32 index) pairs as one int32 tensor [..., k, 2]: 8 bytes per candidate."""
    return torch.stack([scores.float().contiguous().view(torch.int32), indices.to(torch.int32)], -1)


def _exchange_and_merge(scores, gidx, topk, group, size, lq, *, all_to_all):
    packed = _pack_candidates(scores, gidx)  # [B, CP·Lq or Lq, k, 2]
    if all_to_all:
        # Slice j (rank j's queries) goes to rank j; we receive our queries' candidates from every rank.
        send = packed.unflatten(1, (size, lq)).movedim(1, 0).contiguous()  # [CP, B, Lq, k, 2]
        recv = all_to_all_stacked(send, group)
    else:
        recv = all_gather_stacked(packed, group)[0]  # [CP, B, Lq, k, 2]
    b = recv.shape[1]
    out_s = torch.empty(b, lq, topk, dtype=torch.float32, device=recv.device)
    out_i = torch.empty(b, lq, topk, dtype=torch.int32, device=recv.device)
    step = max(1, merge_chunk_rows(size * topk) // b)
    for r in range(0, lq, step):  # query-row chunks: bounded merge temporaries
        part = recv[:, :, r:r + step].movedim(0, 2).flatten(2, 3)  # [B, rows, CP·k, 2]
        cand_scores = part[..., 0].contiguous().view(torch.float32)
        out_s[:, r:r + step], out_i[:, r:r + step] = topk_from_scores(cand_scores, topk, key_indices=part[..., 1])
    return out_s, out_i


def candidate_topk(
    q_index: torch.Tensor,
    weights: torch.Tensor,
    k_index_local: torch.Tensor,
    k_scale_local: torch.Tensor | None,
    topk: int,
    *,
    q_positions: torch.Tensor,
    k_positions_local: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    k_indices_local: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over a sequence-sharded key set by exchanging candidates, not keys (decode over a sharded KV cache).

    Every rank passes the **same** queries and its own key shard; each computes its local top-k
    (score, global index), the ranks all-gather those candidates (8 bytes × k per query per rank) and merge them
    with lowest-global-index tie-breaking. The result is identical on every rank and equals the single-rank
    top-k over the union of the shards.

    Args:
        q_index, weights: [B, Lq, H_I, d_I], [B, Lq, H_I] — identical on all ranks.
        k_index_local, k_scale_local: [B, Lk, d_I], [B, Lk] or None — this rank's shard (Lk may differ by rank).
        q_positions: [Lq], or [B, Lq] (each sequence at its own position); k_positions_local: [Lk] positions
            for the causal rule.
        k_indices_local: [Lk] global index of each local key (default: ``k_positions_local``); must increase
            along the shard so local and global tie-breaking agree (checked on the device, without a host sync).
        group: the process group over which the keys are sharded; None = world.

    Returns:
        ``(topk_scores [B, Lq, k] float32, topk_indices [B, Lq, k] int32 global)``.
    """
    _check_score_inputs(q_index, k_index_local, weights, k_scale_local)
    check_positive_int("topk", topk)
    lk = k_index_local.shape[1]
    device = q_index.device
    if q_positions is not None and q_positions.dim() == 2:  # decode: one position row per sequence
        q_pos = check_query_positions("q_positions", q_positions, q_index.shape[0], q_index.shape[1], device)
    else:
        q_pos = _positions("q_positions", q_positions,
                           torch.empty(q_index.shape[1], dtype=torch.long, device=device))
    k_pos = _positions("k_positions_local", k_positions_local, torch.empty(lk, dtype=torch.long, device=device))
    rows = k_pos if k_indices_local is None else _positions("k_indices_local", k_indices_local, k_pos)
    _check_monotone("k_indices_local" if k_indices_local is not None else "k_positions_local", rows)
    scores, local_idx = _local_topk(q_index, k_index_local, weights, topk, k_scale_local,
                                                        q_positions=q_pos, k_positions=k_pos, chunk_size=chunk_size)
    gidx = _to_global(local_idx, rows)
    size, _ = group_size_rank(group)
    if size == 1:
        return scores, gidx
    return _exchange_and_merge(scores, gidx, topk, group, size, q_index.shape[1], all_to_all=False)
