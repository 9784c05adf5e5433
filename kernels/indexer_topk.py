"""Triton FP8 lightning indexer fused with an exact top-k (docs/design.md, "Lightning indexer" and "Top-k").

Same function as :func:`dsa_dist.ops.topk.lightning_indexer_topk`:

    I[t, s] = k_scale[s] · Σ_h w[t, h] · ReLU(q_I[t, h] · k_I[s])   for k_pos[s] ≤ q_pos[t], −inf otherwise
    S_t     = top-k_s I[t, s]   ordered (score desc, index asc), ties → lowest index, (−inf, −1) padding.

Three kernels per chunk of ``chunk_size`` queries, so memory is O(chunk · Lk + Lq · k), never [Lq, Lk] (the
scoring is here; the selection and the sort, steps 2–3, are in :mod:`kernels.topk_select`):

1. ``_score_kernel`` — one program per (block of ``BLOCK_Q`` queries, batch). The block's queries are folded
   with the heads into one [BLOCK_Q·H_I, d_I] operand that stays on chip; key tiles [BLOCK_K, d_I] stream past
   it. ``tl.dot(k_tile, q^T)`` puts keys on the MMA M dimension and (query, head) on N, so the ReLU, the
   per-head weight and the sum over heads are an epilogue over the accumulator's columns. The per-key scale and
   the causal mask follow; the [BLOCK_K, BLOCK_Q] scores go to an fp32 workspace row slice. Only key blocks up
   to the block's last causal key are visited (when k_positions are sorted, the usual case).
2. ``_select_kernel`` — one program per query row, exact. Fast path: one pass for the row's count / mean / std
   / max / min; 8 thresholds around the Gaussian tail quantile of rank ~1.5·k; one pass counting the scores at
   or above each (order-preserving uint32 keys); the highest threshold whose count lies in
   [k, CAP = 2·next_pow2(k)] wins, and up to two more passes refine a bracketing guess. Rows it cannot settle
   (heavy exact ties) take the exact radix path: 256-bin ``tl.histogram`` levels of 8 bits until the bucket at
   the boundary fits CAP, or down to the full key where the lowest-index equal scores fill the quota. The
   ≤ CAP candidates are compacted (atomic slot counter, any order) as int64 words: score key high,
   ``2^31−1−index`` low. Every candidate at or above the threshold is kept, so ties at the k-th score are all
   present.
3. ``_sort_kernel`` — one program per row sorts its candidate words descending with ``tl.sort`` — exactly the
   order (score desc, index asc), so ties resolve to the lowest index — and unpacks the first k. (Under the
   CPU interpreter, where ``tl.sort`` runs its combine function per element in Python, ranks come from a
   pairwise compare instead.)

Decode (one query per sequence, ``q_positions`` [B, 1] per sequence, B ≤ 64, Lk up to 128K): the grids above
would be B programs, each streaming a whole 128K-key row alone — a few SMs busy out of 132. So when a launch has
fewer programs than SMs, (a) ``_score_kernel`` gets a third grid axis that splits the key range into spans of
whole ``BLOCK_K`` tiles (about 4 programs per SM in all; each writes its own workspace columns, nothing to
merge), and (b) each row's exact selection is split into ``n ≈ sqrt(Lk / k)`` key segments (B·n select programs,
each over Lk / n keys) whose top-k candidates are merged by one more select over the n·k candidates per row —
exact by the same argument as the CP merge (every global top-k key is in its segment's top-k; the merge row
lists segments in key order, so its lowest-column tie-break is the lowest-index rule). Not measured: reasoned
from the grid sizes (see :func:`score_chunk`, :func:`select_segments`). Training grids (≥ SM-count programs) are
unchanged.

Measured on the H100 (benchmarks/NOTES_indexer.md): scores 803–874 TFLOPS FP8-effective; at 128K the exact
select + sort costs about as much again.

Two selection paths, chosen by :data:`SELECT_IMPL` (both exact and bit-identical; the benchmark times both):
``"workspace"`` (default) is steps 1–3 above; ``"filter"`` (:mod:`kernels.topk_filter`) never writes the dense
score rows: a per-row threshold estimated from every S-th key, ``_score_kernel`` with ``FILTER`` storing only the
scores at or above it as candidate words, the same sort, and the rows whose hit count falls outside [k, CAP] re-run
densely in the same chunk (no host synchronisation). Launches with fewer rows than :func:`target_programs` (decode)
keep the workspace path and its key-split grids.

There is no backward: indices are not differentiable (the KL kernels in ``kernels/indexer_kl.py`` recompute the
selected scores with gradients).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels._checks import check_indexer_inputs, check_launchable, check_positions, check_positive_int
from kernels.topk_select import _as_rows, _ordered_key, select_chunk  # noqa: F401 - select_chunk: module API

FAST_SELECT = True  # threshold-counting fast path (False: always the radix path; for tests)
SELECT_IMPL = "workspace"  # "filter": threshold-filtered scoring (kernels/topk_filter.py); "workspace": dense rows
WORKSPACE_ELEMS = 1 << 29  # fp32 score workspace budget per chunk (2 GiB) when chunk_size is None
TARGET_PROGRAMS: int | None = None  # programs a launch aims for (None: 4 per SM on CUDA, 1 on CPU); see
# target_programs — the decode key splits of the score and select launches follow it


# ----------------------------------------------------------------------------------------------------------------
# 1. scores of one query chunk into the workspace
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _score_kernel(
    q_ptr, k_ptr, w_ptr, ks_ptr, qpos_ptr, kpos_ptr, kend_ptr, ws_ptr, thr_ptr, hits_ptr,
    q_start, n_q, n_k, n_blocks, span,
    stride_qpb, stride_keb, stride_thb,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt,
    stride_wb, stride_wt,
    stride_ksb,
    stride_wsb, stride_wst,
    H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_KSCALE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    FILTER: tl.constexpr, CAP: tl.constexpr,
):
    # Longest blocks (latest queries) first: better tail balance for the causal triangle.
    blk = n_blocks - 1 - tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k_lo = tl.program_id(2) * span  # this program's key range: [k_lo, min(k_lo + span, kend))
    rows = tl.arange(0, BLOCK_Q * HP)  # (query, head) pairs folded onto the MMA N dimension
    qi = rows // HP
    hi = rows % HP
    t_loc = blk * BLOCK_Q + qi  # query row inside the chunk
    row_ok = (t_loc < n_q) & (hi < H)
    t = (q_start + t_loc).to(tl.int64)
    dd = tl.arange(0, DP)
    q = tl.load(
        q_ptr + b * stride_qb + t[:, None] * stride_qt + hi[:, None] * stride_qh + dd[None, :],
        mask=row_ok[:, None] & (dd[None, :] < D), other=0.0,
    )  # [BLOCK_Q·HP, DP]
    if UPCAST:
        q = q.to(tl.float32)
    w = tl.load(w_ptr + b * stride_wb + t * stride_wt + hi, mask=row_ok, other=0.0)  # [BLOCK_Q·HP] fp32
    qq = blk * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qq < n_q
    qpos = tl.load(qpos_ptr + b * stride_qpb + q_start + qq, mask=q_ok, other=-1)  # [BLOCK_Q]
    kend = tl.minimum(tl.load(kend_ptr + b * stride_keb + blk), k_lo + span)
    qT = tl.trans(q)
    if FILTER:  # per-query threshold, loop-invariant like qpos (the loop below carries no state)
        thr = tl.load(thr_ptr + b * stride_thb + qq, mask=q_ok, other=float("inf"))
    for k0 in range(k_lo, kend, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < n_k
        kt = tl.load(
            k_ptr + b * stride_kb + kk[:, None].to(tl.int64) * stride_kt + dd[None, :],
            mask=k_ok[:, None] & (dd[None, :] < D), other=0.0,
        )  # [BLOCK_K, DP]
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:
            acc = tl.dot(kt, qT, input_precision="ieee")
        else:
            acc = tl.dot(kt, qT)  # [BLOCK_K, BLOCK_Q·HP] fp32
        acc = tl.maximum(acc, 0.0) * w[None, :]
        s = tl.sum(tl.reshape(acc, (BLOCK_K, BLOCK_Q, HP)), axis=2)  # [BLOCK_K, BLOCK_Q]
        if HAS_KSCALE:
            ks = tl.load(ks_ptr + b * stride_ksb + kk, mask=k_ok, other=0.0)
            s = s * ks[:, None]
        kpos = tl.load(kpos_ptr + kk, mask=k_ok, other=0)
        # A NaN score (NaN/inf in q, k, weights or k_scale) is not a key: the select kernel's counts and its
        # compaction order NaN differently (a negative NaN is counted but never compacted), so a NaN left in the
        # row makes the sort read unwritten candidate slots and return indices past Lk.
        ok = (kpos[:, None] <= qpos[None, :]) & k_ok[:, None] & (s == s)
        s = tl.where(ok, s, float("-inf"))
        if FILTER:
            # Filtered epilogue (kernels/topk_filter.py): only scores ≥ the row's threshold leave the chip, as the
            # packed candidate words of the select kernel's compaction, each in a slot reserved by an atomic on
            # the row's hit counter. Every hit is counted, also past CAP (the caller then re-runs the row dense).
            # (s is −inf where not ok; a −inf score of a causal key is no key either, as in the select kernel)
            hit = (s > float("-inf")) & (s >= thr[None, :]) & q_ok[None, :]
            slot = tl.atomic_add(tl.broadcast_to(hits_ptr + b * stride_thb + qq[None, :], (BLOCK_K, BLOCK_Q)), 1,
                                 mask=hit, sem="relaxed")
            skey = (_ordered_key(s) ^ 0x80000000).to(tl.int32, bitcast=True)  # signed order = float order
            packed = (skey.to(tl.int64) << 32) | (2147483647 - kk[:, None]).to(tl.int64)
            tl.store(ws_ptr + b * stride_wsb + qq[None, :].to(tl.int64) * stride_wst + slot, packed,
                     mask=hit & (slot < CAP))
        else:
            tl.store(
                ws_ptr + b * stride_wsb + qq[None, :].to(tl.int64) * stride_wst + kk[:, None],
                s, mask=q_ok[None, :] & k_ok[:, None],
            )


# ----------------------------------------------------------------------------------------------------------------
# wrapper
# ----------------------------------------------------------------------------------------------------------------
def _score_config(heads_p: int, dim_p: int, on_gpu: bool) -> dict:
    """Block shapes of the score kernel: 128 (query, head) columns per MMA, 128-key tiles, one warpgroup
    (measured best of 6 tile configs on the H100 at H_I=64, d_I=128: 874 TFLOPS at 16K)."""
    if not on_gpu:
        return {"BLOCK_Q": max(1, 32 // heads_p), "BLOCK_K": 32, "num_warps": 1, "num_stages": 1}
    return {"BLOCK_Q": max(1, 128 // heads_p), "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


def _prepare(q_index, k_index, weights, k_scale):
    """Common dtype for the dot operands (fp8, fp16, bf16 or fp32), fp32 weights / scales, unit-stride last dims."""
    if q_index.dtype != k_index.dtype or q_index.dtype == torch.float64:
        q_index, k_index = q_index.float(), k_index.float()
    if q_index.stride(-1) != 1:
        q_index = q_index.contiguous()
    if k_index.stride(-1) != 1:
        k_index = k_index.contiguous()
    weights = weights.float().contiguous()
    if k_scale is not None:
        k_scale = k_scale.float().contiguous()
    return q_index, k_index, weights, k_scale


def _row_lengths(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Per query: how many leading keys to read. Sorted keys → the causal prefix; otherwise all keys.

    Decided on the device (``torch.where`` on the sortedness flag), never on the host: reading the flag would
    stall the CPU on every top-k call (4× per layer in the CP ring). Unsorted keys are valid input (the kernels
    mask by position), they only lose the prefix skip.
    """
    lk = k_pos.shape[0]
    prefix = torch.searchsorted(k_pos.contiguous(), q_pos.contiguous(), right=True).to(torch.int32)
    if lk <= 1:
        return prefix
    # searchsorted of unsorted keys is meaningless but in [0, lk]; where() discards it
    return torch.where((k_pos[1:] >= k_pos[:-1]).all(), prefix, lk)


def target_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device: 4 per SM on CUDA (:data:`TARGET_PROGRAMS` overrides;
    the CPU interpreter default 1 means no split; tests raise it to exercise the split paths)."""
    if TARGET_PROGRAMS is not None:
        return TARGET_PROGRAMS
    if device.type != "cuda":
        return 1
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def score_chunk(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    row_len: torch.Tensor,
    q_start: int,
    n_q: int,
    workspace: torch.Tensor,
    config: dict | None = None,
    filter_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Write the scores of queries [q_start, q_start+n_q) into ``workspace`` [B, ≥n_q, ≥max row_len] (fp32).

    Row r holds I[q_start + r, s] for s < row_len[q_start + r] (−inf where not causal); later columns are not
    written. ``q_pos`` and ``row_len`` are [Lq] (shared by the batch) or [B, Lq] (per sequence). Inputs as
    prepared by :func:`_prepare`; exposed for the benchmark and the exactness tests.

    Grid: (query blocks, B, key splits). With few query blocks — decode: Lq = 1, so B programs — each program
    would stream every key of a 128K cache alone and a small batch would occupy a few SMs; the key range is then
    split over ``splits`` programs (enough for :func:`target_programs`, whole ``BLOCK_K`` tiles each). Every
    program writes its own disjoint columns of the workspace, so nothing needs merging. ``config["SPLITS"]``
    forces the split count.

    ``filter_rows = (thresholds, hits)`` (both [B, ≥n_q], unit last stride; fp32 and int32 zeros) switches to the
    filtered epilogue: ``workspace`` is then the [B, ≥n_q, CAP] int64 candidate buffer and row r receives only
    its scores ≥ ``thresholds[:, r]`` as packed words (score key high, ``2^31−1−index`` low) in the slots an
    atomic on ``hits[:, r]`` hands out; ``hits`` ends as the number of such scores, also when above CAP (then
    only CAP of them are stored). The scores are those of the dense epilogue: same kernel, same tiles.
    """
    b, _, h, d = q_index.shape
    n_k = k_index.shape[1]
    hp, dp = triton.next_power_of_2(h), max(32, triton.next_power_of_2(d))
    cfg = dict(_score_config(hp, dp, q_index.is_cuda)) | (config or {})
    bq, bk = cfg.pop("BLOCK_Q"), cfg.pop("BLOCK_K")
    n_blocks = triton.cdiv(n_q, bq)
    q_rows, stride_qpb = _as_rows(q_pos)
    lens = _as_rows(row_len)[0][:, q_start:q_start + n_q]
    pad = n_blocks * bq - n_q
    if pad:
        lens = torch.nn.functional.pad(lens, (0, pad))
    kend, stride_keb = _as_rows(lens.reshape(lens.shape[0], n_blocks, bq).amax(2))  # keys each query block visits
    tiles = max(1, triton.cdiv(n_k, bk))
    splits = cfg.pop("SPLITS", None)
    if splits is None:  # split only a launch with fewer programs than SMs (decode); training grids are unchanged
        target = target_programs(q_index.device)
        splits = min(tiles, target // (n_blocks * b)) if 4 * n_blocks * b <= target else 1
    span = triton.cdiv(tiles, splits) * bk
    splits = triton.cdiv(tiles * bk, span)
    ks = k_scale if k_scale is not None else weights  # dummy pointer when absent
    upcast = (not q_index.is_cuda) and q_index.dtype == torch.bfloat16  # interpreter: bf16 dot is wrong
    if filter_rows is None:
        thr, hits, cap = weights, weights, 1  # dummy pointers; the dense epilogue does not read them
    else:
        thr, hits = filter_rows
        if thr.stride() != hits.stride() or thr.stride(-1) != 1 or thr.shape[0] != b:
            raise ValueError(f"filter_rows must be two [B, ≥n_q] tensors of equal strides, got {tuple(thr.shape)} "
                             f"{thr.stride()} and {tuple(hits.shape)} {hits.stride()}")
        cap = workspace.shape[-1]
    _score_kernel[(n_blocks, b, splits)](
        q_index, k_index, weights, ks, q_rows, k_pos, kend, workspace, thr, hits,
        q_start, n_q, n_k, n_blocks, span,
        stride_qpb, stride_keb, thr.stride(0),
        q_index.stride(0), q_index.stride(1), q_index.stride(2),
        k_index.stride(0), k_index.stride(1),
        weights.stride(0), weights.stride(1),
        ks.stride(0),
        workspace.stride(0), workspace.stride(1),
        H=h, D=d, HP=hp, DP=dp, BLOCK_Q=bq, BLOCK_K=bk,
        HAS_KSCALE=k_scale is not None, UPCAST=upcast, IEEE=q_index.dtype == torch.float32 or upcast,
        FILTER=filter_rows is not None, CAP=cap,
        **cfg,
    )



def select_segments(rows: int, width: int, topk: int, device: torch.device) -> int:
    """How many key segments each row's exact selection is split into (1: none).

    The select kernel runs one program per row, so ``rows`` = B·Lq programs; at decode (Lq = 1, B ≤ 64) each would
    make its ~5 passes over a 128K-entry row alone while most SMs idle. Splitting a row into ``n`` segments
    gives B·Lq·n programs that each select the top-k of L/n entries, then one merge row of n·k candidates per
    query; the two passes cost ∝ L/n and n·k, balanced near n = sqrt(L/k) (128K keys, k = 512: 16 segments of
    8K). Segments shorter than 4·CAP would make the merge the larger part, so they are not split further.
    """
    target = target_programs(device)
    cap = 2 * triton.next_power_of_2(topk)
    if rows >= target or width < 8 * cap:
        return 1
    n = min(max(2, round(math.sqrt(width / topk))), width // (4 * cap), -(-target // rows))
    return max(1, n)


def _segmented_select(workspace: torch.Tensor, row_len: torch.Tensor, out_s: torch.Tensor, out_i: torch.Tensor,
                      q_start: int, n_q: int, topk: int, n_seg: int) -> None:
    """:func:`select_chunk` of workspace rows [0, n_q) with each row split into ``n_seg`` key segments.

    Exact: every key of the row's top-k — under the total order (score desc, index asc) — is in the top-k of
    its segment, so the merge of the segments' candidates finds the same set. The merge row lists the segments
    in key order, each sorted (score desc, index asc), so among equal scores the column order is the key order
    and the merge's lowest-column tie-break is the lowest-index rule.
    """
    b, chunk, width = workspace.shape
    seg_len = width // n_seg
    dev = workspace.device
    cap = 2 * triton.next_power_of_2(topk)
    lens = _as_rows(row_len)[0][:, q_start:q_start + n_q]  # [1 or B, n_q]
    starts = torch.arange(n_seg, device=dev, dtype=lens.dtype) * seg_len
    seg_lens = (lens[..., None] - starts).clamp(0, seg_len).reshape(lens.shape[0], n_q * n_seg).to(torch.int32)
    rows = n_q * n_seg
    seg_s = torch.empty(b, rows, topk, dtype=torch.float32, device=dev)
    seg_i = torch.empty(b, rows, topk, dtype=torch.int32, device=dev)
    counters = torch.zeros(2, b, rows, dtype=torch.int32, device=dev)
    cand = torch.empty(b, rows, cap, dtype=torch.int64, device=dev)
    seg_ws = workspace[:, :n_q].reshape(b, rows, seg_len)  # a view: the workspace is contiguous
    select_chunk(seg_ws, seg_lens, counters, cand, seg_s, seg_i, 0, rows, topk, FAST_SELECT)
    offsets = starts.repeat(n_q).view(1, rows, 1).to(torch.int32)
    seg_i = torch.where(seg_i >= 0, seg_i + offsets, -1).view(b, n_q, n_seg * topk)
    merge_s = torch.empty(b, n_q, topk, dtype=torch.float32, device=dev)
    merge_i = torch.empty(b, n_q, topk, dtype=torch.int32, device=dev)
    counters.zero_()
    merge_len = torch.full((n_q,), n_seg * topk, dtype=torch.int32, device=dev)
    select_chunk(seg_s.view(b, n_q, n_seg * topk), merge_len, counters, cand, merge_s, merge_i, 0, n_q, topk,
                 FAST_SELECT)
    picked = seg_i.gather(-1, merge_i.long().clamp_min(0))
    out_s[:, q_start:q_start + n_q] = merge_s
    out_i[:, q_start:q_start + n_q] = torch.where(merge_i >= 0, picked, -1)


def _query_positions(q_positions: torch.Tensor | None, b: int, lq: int, dev: torch.device) -> torch.Tensor:
    """[Lq] shared, or [B, Lq] per sequence (decode), as contiguous int64."""
    if q_positions is None or q_positions.dim() != 2:
        return check_positions("q_positions", q_positions, lq, dev).contiguous()
    if q_positions.dtype not in (torch.int32, torch.int64) or tuple(q_positions.shape) != (b, lq):
        raise ValueError(f"q_positions must be int [{lq}] (shared) or [{b}, {lq}] (per sequence), got "
                         f"{q_positions.dtype} {tuple(q_positions.shape)}")
    if q_positions.device != dev:
        raise ValueError(f"q_positions is on {q_positions.device}, expected {dev}")
    return q_positions.long().contiguous()


def lightning_indexer_topk(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    k_scale: torch.Tensor | None = None,
    *,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal top-k keys of every query under the lightning-indexer score, without an [Lq, Lk] tensor.

    Args:
        q_index: [B, Lq, H_I, d_I] e4m3 (q scale folded into ``weights``), or fp16/bf16/fp32.
        k_index: [B, Lk, d_I] one index key per token, same dtype family as ``q_index``.
        weights: [B, Lq, H_I] per-head weights (may be negative).
        topk: k (> 0); may exceed Lk (tail padded with −1).
        k_scale: [B, Lk] per-key FP8 scale, applied after the head sum, or None.
        q_positions / k_positions: [Lq] / [Lk] global positions for the causal rule (default arange);
            ``q_positions`` may be [B, Lq], one row per sequence (decode over a cache, each sequence at its own
            position: only its keys at positions ≤ its own are scored and read).
        chunk_size: queries scored per workspace fill (default: as many as fit 2 GiB of fp32 scores).

    Returns:
        ``(topk_scores [B, Lq, k] float32, topk_indices [B, Lq, k] int32)`` ordered (score desc, index asc),
        ties to the lowest index, (−inf, −1) in slots with no valid key; a key whose score is NaN is no valid
        key (never selected), so every index is −1 or in [0, Lk) for any input. Peak extra memory:
        ``4·B·chunk·Lk + 8·B·chunk·next_pow2(k)`` bytes (``SELECT_IMPL = "filter"``: the same, plus
        ``4·B·chunk·Lk / S`` of sampled scores; the workspace is then written only for rows it re-runs densely).

    Decode (Lq = 1, B ≤ 64, Lk up to 128K): the score grid splits the key range over programs
    (:func:`score_chunk`) and the selection splits each row into key segments merged exactly
    (:func:`select_segments`), so neither launch collapses to B programs.
    """
    check_indexer_inputs(q_index, k_index, weights, k_scale)
    check_positive_int("topk", topk)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    check_launchable(_score_kernel, q_index)
    b, lq = q_index.shape[:2]
    lk = k_index.shape[1]
    dev = q_index.device
    q_pos = _query_positions(q_positions, b, lq, dev)
    k_pos = check_positions("k_positions", k_positions, lk, dev).contiguous()
    q_index, k_index, weights, k_scale = _prepare(q_index, k_index, weights, k_scale)
    out_s = torch.empty(b, lq, topk, dtype=torch.float32, device=dev)
    out_i = torch.empty(b, lq, topk, dtype=torch.int32, device=dev)
    if lq == 0:
        return out_s, out_i
    row_len = _row_lengths(q_pos, k_pos)  # [Lq] or [B, Lq]
    if SELECT_IMPL == "filter" and b * lq >= target_programs(dev):
        from kernels.topk_filter import filtered_topk  # imports this module: resolved at call time

        filtered_topk(q_index, k_index, weights, k_scale, q_pos, k_pos, row_len, topk, chunk_size, out_s, out_i)
    elif SELECT_IMPL in ("filter", "workspace"):
        workspace_topk(q_index, k_index, weights, k_scale, q_pos, k_pos, row_len, topk, chunk_size, out_s, out_i)
    else:
        raise ValueError(f"kernels.indexer_topk.SELECT_IMPL must be 'filter' or 'workspace', got {SELECT_IMPL!r}")
    return out_s, out_i


def workspace_chunk(b: int, lq: int, lk: int, chunk_size: int | None) -> int:
    """Queries per workspace fill: ``chunk_size``, else as many as fit :data:`WORKSPACE_ELEMS` fp32 scores."""
    if chunk_size is None:
        chunk_size = max(1, min(lq, WORKSPACE_ELEMS // (b * max(1, lk))))
    return max(1, min(chunk_size, lq))


def workspace_topk(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    row_len: torch.Tensor,
    topk: int,
    chunk_size: int | None,
    out_s: torch.Tensor,
    out_i: torch.Tensor,
) -> None:
    """The dense-workspace path: every causal score of a query chunk into the fp32 workspace, then the exact
    select and sort (or the segmented select when the launch is small, e.g. decode). Inputs as prepared by
    :func:`_prepare`; ``q_pos``/``row_len`` [Lq] or [B, Lq]; writes all Lq rows of ``out_s``/``out_i``. The
    filtered path's fallback runs the same kernels on its failing rows
    (:meth:`kernels.topk_filter.FilterPlan.fallback`)."""
    b, lq = q_index.shape[:2]
    dev = q_index.device
    width = max(1, k_index.shape[1])
    chunk = workspace_chunk(b, lq, width, chunk_size)
    n_seg = select_segments(b * chunk, width, topk, dev)
    width = triton.cdiv(width, n_seg) * n_seg  # whole segments (columns ≥ Lk are never read)
    cap = 2 * triton.next_power_of_2(topk)  # candidate slots per row (≥ k plus the boundary bucket)
    workspace = torch.empty(b, chunk, width, dtype=torch.float32, device=dev)
    if n_seg == 1:
        cand = torch.empty(b, chunk, cap, dtype=torch.int64, device=dev)
        counters = torch.empty(2, b, chunk, dtype=torch.int32, device=dev)
    for start in range(0, lq, chunk):
        n_q = min(chunk, lq - start)
        score_chunk(q_index, k_index, weights, k_scale, q_pos, k_pos, row_len, start, n_q, workspace)
        if n_seg > 1:
            _segmented_select(workspace, row_len, out_s, out_i, start, n_q, topk, n_seg)
            continue
        counters.zero_()
        select_chunk(workspace, row_len, counters, cand, out_s, out_i, start, n_q, topk, FAST_SELECT)
