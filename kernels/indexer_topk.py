"""Triton FP8 lightning indexer fused with an exact top-k (DESIGN.md §1, §5; issue 7 item 1).

Same function as :func:`dsa_dist.ops.topk.lightning_indexer_topk`:

    I[t, s] = k_scale[s] · Σ_h w[t, h] · ReLU(q_I[t, h] · k_I[s])   for k_pos[s] ≤ q_pos[t], −inf otherwise
    S_t     = top-k_s I[t, s]   ordered (score desc, index asc), ties → lowest index, (−inf, −1) padding.

Three kernels per chunk of ``chunk_size`` queries, so memory is O(chunk · Lk + Lq · k), never [Lq, Lk]:

1. ``_score_kernel`` — one program per (block of ``BLOCK_Q`` queries, batch). The block's queries are folded
   with the heads into one [BLOCK_Q·H_I, d_I] operand that stays on chip; key tiles [BLOCK_K, d_I] stream past
   it. ``tl.dot(k_tile, q^T)`` puts keys on the MMA M dimension and (query, head) on N, so the ReLU, the
   per-head weight and the sum over heads are an epilogue over the accumulator's columns. The per-key scale and
   the causal mask follow; the [BLOCK_K, BLOCK_Q] scores go to an fp32 workspace row slice. Only key blocks up
   to the block's last causal key are visited (when k_positions are sorted, the usual case).
2. ``_select_kernel`` — one program per query row: exact radix select over the order-preserving uint32 image of
   the fp32 scores, 8 bits per pass (``tl.histogram`` of 256 bins), stopping early once the boundary bucket is
   taken whole. A final pass writes the chosen (score, index) pairs, in ascending key order, packed into int64
   (score key in the high word, ``2^31−1−index`` in the low word); ties at the threshold take the lowest indices.
3. ``_sort_kernel`` — one program per row sorts the k packed words descending (``tl.sort``), which is exactly
   the order (score desc, index asc), and unpacks them into the outputs.

There is no backward: indices are not differentiable (the KL kernels in ``kernels/indexer_kl.py`` recompute the
selected scores with gradients).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsa_dist.ops import topk as _ref
from dsa_dist.ops._checks import check_positions, check_positive_int
from dsa_dist.ops.indexer import _check_score_inputs

INT64_MIN = -(2**63)
INT64_MIN_C: tl.constexpr = tl.constexpr(INT64_MIN)  # empty slot in the packed buffer (sorts last)
WORKSPACE_ELEMS = 1 << 29  # fp32 score workspace budget per chunk (2 GiB) when chunk_size is None


# ----------------------------------------------------------------------------------------------------------------
# 1. scores of one query chunk into the workspace
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _score_kernel(
    q_ptr, k_ptr, w_ptr, ks_ptr, qpos_ptr, kpos_ptr, kend_ptr, ws_ptr,
    q_start, n_q, n_k, n_blocks,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt,
    stride_wb, stride_wt,
    stride_ksb,
    stride_wsb, stride_wst,
    H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_KSCALE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # Longest blocks (latest queries) first: better tail balance for the causal triangle.
    blk = n_blocks - 1 - tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
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
    qpos = tl.load(qpos_ptr + q_start + qq, mask=q_ok, other=-1)  # [BLOCK_Q]
    kend = tl.load(kend_ptr + blk)
    qT = tl.trans(q)
    for k0 in range(0, kend, BLOCK_K):
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
        ok = (kpos[:, None] <= qpos[None, :]) & k_ok[:, None]
        s = tl.where(ok, s, float("-inf"))
        tl.store(
            ws_ptr + b * stride_wsb + qq[None, :].to(tl.int64) * stride_wst + kk[:, None],
            s, mask=q_ok[None, :] & k_ok[:, None],
        )


# ----------------------------------------------------------------------------------------------------------------
# 2. exact radix select of each row's k largest (ties → lowest index), packed as int64
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _ordered_key(x):
    """uint32 whose unsigned order is the float order of fp32 ``x`` (−inf → 0x007FFFFF)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)


@triton.jit
def _histogram_pass(row_ptr, n, n_max, shift, prefix, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per-row 256-bin histograms [ROWS, 256] of digit ``(key >> shift) & 255`` over valid entries whose higher
    digits equal ``prefix`` (``row_ptr``, ``n``, ``shift``, ``prefix`` are [ROWS]).

    The rows share one ``tl.histogram`` of ROWS·256 bins (digit + 256·row); the GPU path uses ROWS = 1, the
    interpreter batches rows to amortise its per-op cost.
    """
    hist = tl.zeros([ROWS * 256], dtype=tl.int32)
    row_bin0 = (tl.arange(0, ROWS * 256) % 256) == 0
    rid = tl.arange(0, ROWS)
    for start in range(0, n_max, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr[:, None] + offs[None, :], mask=offs[None, :] < n[:, None], other=float("-inf"))
        hi = _ordered_key(x) >> shift[:, None]
        match = (x != float("-inf")) & ((hi >> 8) == prefix[:, None])
        digit = tl.where(match, hi & 255, 0).to(tl.int32) + rid[:, None] * 256
        # Non-matching entries were counted in their row's bin 0; take them out again (no masked histogram).
        miss = BLOCK - tl.sum(match.to(tl.int32), axis=1)  # [ROWS]
        fix = tl.reshape(tl.broadcast_to(miss[:, None], (ROWS, 256)), (ROWS * 256,))
        hist += tl.histogram(tl.reshape(digit, (ROWS * BLOCK,)), ROWS * 256) - tl.where(row_bin0, fix, 0)
    return tl.reshape(hist, (ROWS, 256))


@triton.jit
def _select_kernel(
    ws_ptr, nrow_ptr, out_ptr,
    q_start, n_q,
    stride_wsb, stride_wst, stride_ob, stride_ot,
    K: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b = tl.program_id(1).to(tl.int64)
    # Scores of row r live in ws[b, r, :n]; entries ≥ n are never read. Padding rows get n = 0.
    n = tl.load(nrow_ptr + q_start + rows, mask=rows < n_q, other=0)
    n_max = tl.max(n, axis=0)
    row_ptr = ws_ptr + b * stride_wsb + rows.to(tl.int64) * stride_wst  # [ROWS]
    out_row = out_ptr + b * stride_ob + rows.to(tl.int64) * stride_ot
    bins = tl.arange(0, 256)

    shift = tl.full([ROWS], 24, dtype=tl.int32)
    prefix = tl.zeros([ROWS], dtype=tl.uint32)
    hist = _histogram_pass(row_ptr, n, n_max, shift, prefix, ROWS, BLOCK)
    n_valid = tl.sum(hist, axis=1)
    take_all = n_valid <= K
    remaining = tl.minimum(n_valid, K)  # how many still to take from the bucket under refinement
    done = take_all.to(tl.int32)
    while tl.min(done, axis=0) == 0:
        # boundary digit: count(digit > d) < remaining ≤ count(digit ≥ d)
        ge = tl.cumsum(hist, axis=1, reverse=True)
        dsel = tl.max(tl.where(ge >= remaining[:, None], bins[None, :], -1), axis=1)
        above = tl.sum(tl.where(bins[None, :] > dsel[:, None], hist, 0), axis=1)
        in_bin = tl.sum(tl.where(bins[None, :] == dsel[:, None], hist, 0), axis=1)
        active = done == 0
        remaining = tl.where(active, remaining - above, remaining)
        prefix = tl.where(active, (prefix << 8) | dsel.to(tl.uint32), prefix)
        # Stop once the boundary bucket is taken whole, or at full key width.
        done = tl.where(active & ((in_bin == remaining) | (shift == 0)), 1, done)
        shift = tl.where(done == 0, shift - 8, shift)
        if tl.min(done, axis=0) == 0:
            hist = _histogram_pass(row_ptr, n, n_max, shift, prefix, ROWS, BLOCK)
    # Fewer than k valid: take every valid entry (key > key(−inf) at full width).
    shift = tl.where(take_all, 0, shift)
    prefix = tl.where(take_all, 0x007FFFFF, prefix)
    remaining = tl.where(take_all, 0, remaining)

    # Gather in ascending key order: all with prefix above the threshold, then the first `remaining` equal ones.
    taken = tl.zeros([ROWS], dtype=tl.int32)
    eq_seen = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, n_max, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr[:, None] + offs[None, :], mask=offs[None, :] < n[:, None], other=float("-inf"))
        ukey = _ordered_key(x)
        hi = ukey >> shift[:, None]
        valid = x != float("-inf")
        gt = valid & (hi > prefix[:, None])
        eq = valid & (hi == prefix[:, None])
        eq_i = eq.to(tl.int32)
        eq_rank = eq_seen[:, None] + tl.cumsum(eq_i, axis=1) - eq_i
        sel = gt | (eq & (eq_rank < remaining[:, None]))
        sel_i = sel.to(tl.int32)
        pos = taken[:, None] + tl.cumsum(sel_i, axis=1) - sel_i
        skey = (ukey ^ 0x80000000).to(tl.int32, bitcast=True)  # signed order = float order
        packed = (skey.to(tl.int64) << 32) | (2147483647 - offs[None, :]).to(tl.int64)
        tl.store(out_row[:, None] + pos, packed, mask=sel)
        taken += tl.sum(sel_i, axis=1)
        eq_seen += tl.sum(eq_i, axis=1)
    for start in range(0, KP, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        pad = tl.full([ROWS, BLOCK], INT64_MIN_C, dtype=tl.int64)
        keep = (offs[None, :] >= taken[:, None]) & (offs[None, :] < KP) & (rows[:, None] < n_q)
        tl.store(out_row[:, None] + offs[None, :], pad, mask=keep)


# ----------------------------------------------------------------------------------------------------------------
# 3. order each row's k picks by (score desc, index asc) and unpack
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _sort_kernel(
    packed_ptr, s_ptr, i_ptr,
    q_start, n_q,
    stride_pb, stride_pt, stride_sb, stride_st,
    K: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, KP)
    row_ok = rows < n_q
    p = tl.load(packed_ptr + b * stride_pb + rows[:, None].to(tl.int64) * stride_pt + offs[None, :],
                mask=row_ok[:, None], other=INT64_MIN_C)
    p = tl.sort(p, dim=1, descending=True)  # [ROWS, KP]
    empty = p == INT64_MIN_C
    skey = (p >> 32).to(tl.int32)
    bits = skey ^ ((skey >> 31) & 0x7FFFFFFF)
    score = tl.where(empty, float("-inf"), bits.to(tl.float32, bitcast=True))
    idx = tl.where(empty, -1, 2147483647 - (p & 0xFFFFFFFF).to(tl.int32))
    t = (q_start + rows).to(tl.int64)
    mask = row_ok[:, None] & (offs[None, :] < K)
    tl.store(s_ptr + b * stride_sb + t[:, None] * stride_st + offs[None, :], score, mask=mask)
    tl.store(i_ptr + b * stride_sb + t[:, None] * stride_st + offs[None, :], idx, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# wrapper
# ----------------------------------------------------------------------------------------------------------------
def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _score_config(heads_p: int, dim_p: int, on_gpu: bool) -> dict:
    """Block shapes of the score kernel: ~128 (query, head) columns per MMA, 128-key tiles."""
    block_q = max(1, 128 // heads_p) if on_gpu else max(1, 32 // heads_p)
    return {"BLOCK_Q": block_q, "BLOCK_K": 128 if on_gpu else 32, "num_warps": 8 if on_gpu else 1,
            "num_stages": 3 if on_gpu else 1}


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
    """Per query: how many leading keys to read. Sorted keys → the causal prefix; otherwise all keys."""
    lk = k_pos.shape[0]
    if lk > 1 and not bool((k_pos[1:] >= k_pos[:-1]).all()):  # one host sync; keys are sorted in practice
        return torch.full((q_pos.shape[0],), lk, dtype=torch.int32, device=q_pos.device)
    return torch.searchsorted(k_pos.contiguous(), q_pos.contiguous(), right=True).to(torch.int32)


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
) -> None:
    """Write the scores of queries [q_start, q_start+n_q) into ``workspace`` [B, ≥n_q, ≥max row_len] (fp32).

    Row r holds I[q_start + r, s] for s < row_len[q_start + r] (−inf where not causal); later columns are not
    written. Inputs as prepared by :func:`_prepare`; exposed for the benchmark and the exactness tests.
    """
    b, _, h, d = q_index.shape
    n_k = k_index.shape[1]
    hp, dp = triton.next_power_of_2(h), max(32, triton.next_power_of_2(d))
    cfg = dict(_score_config(hp, dp, q_index.is_cuda)) | (config or {})
    bq, bk = cfg.pop("BLOCK_Q"), cfg.pop("BLOCK_K")
    n_blocks = triton.cdiv(n_q, bq)
    lens = row_len[q_start:q_start + n_q]
    pad = n_blocks * bq - n_q
    if pad:
        lens = torch.nn.functional.pad(lens, (0, pad))
    kend = lens.view(n_blocks, bq).amax(1).contiguous()  # keys each query block must visit
    ks = k_scale if k_scale is not None else weights  # dummy pointer when absent
    upcast = (not q_index.is_cuda) and q_index.dtype == torch.bfloat16  # interpreter: bf16 dot is wrong
    _score_kernel[(n_blocks, b)](
        q_index, k_index, weights, ks, q_pos, k_pos, kend, workspace,
        q_start, n_q, n_k, n_blocks,
        q_index.stride(0), q_index.stride(1), q_index.stride(2),
        k_index.stride(0), k_index.stride(1),
        weights.stride(0), weights.stride(1),
        ks.stride(0),
        workspace.stride(0), workspace.stride(1),
        H=h, D=d, HP=hp, DP=dp, BLOCK_Q=bq, BLOCK_K=bk,
        HAS_KSCALE=k_scale is not None, UPCAST=upcast, IEEE=q_index.dtype == torch.float32 or upcast,
        **cfg,
    )


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
        q_positions / k_positions: [Lq] / [Lk] global positions for the causal rule (default arange).
        chunk_size: queries scored per workspace fill (default: as many as fit 2 GiB of fp32 scores).

    Returns:
        ``(topk_scores [B, Lq, k] float32, topk_indices [B, Lq, k] int32)`` ordered (score desc, index asc),
        ties to the lowest index, (−inf, −1) in slots with no valid key. Peak extra memory:
        ``4·B·chunk·Lk + 8·B·chunk·next_pow2(k)`` bytes.
    """
    _check_score_inputs(q_index, k_index, weights, k_scale)
    check_positive_int("topk", topk)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    if not _use_triton(q_index):
        return _ref.lightning_indexer_topk(
            q_index, k_index, weights, topk, k_scale, q_positions=q_positions, k_positions=k_positions,
            chunk_size=chunk_size or 512,
        )
    b, lq = q_index.shape[:2]
    lk = k_index.shape[1]
    dev = q_index.device
    q_pos = check_positions("q_positions", q_positions, lq, dev).contiguous()
    k_pos = check_positions("k_positions", k_positions, lk, dev).contiguous()
    q_index, k_index, weights, k_scale = _prepare(q_index, k_index, weights, k_scale)
    out_s = torch.empty(b, lq, topk, dtype=torch.float32, device=dev)
    out_i = torch.empty(b, lq, topk, dtype=torch.int32, device=dev)
    if lq == 0:
        return out_s, out_i
    row_len = _row_lengths(q_pos, k_pos)
    width = max(1, lk)
    if chunk_size is None:
        chunk_size = max(1, min(lq, WORKSPACE_ELEMS // (b * width)))
    chunk = min(chunk_size, lq)
    kp = triton.next_power_of_2(topk)
    workspace = torch.empty(b, chunk, width, dtype=torch.float32, device=dev)
    packed = torch.empty(b, chunk, kp, dtype=torch.int64, device=dev)
    on_gpu = q_index.is_cuda
    # GPU: one row per program (the histogram cost grows with ROWS); interpreter: batch rows (per-op overhead).
    rows, sel_block, warps = (1, 4096, 8) if on_gpu else (16, 64, 1)
    for start in range(0, lq, chunk):
        n_q = min(chunk, lq - start)
        score_chunk(q_index, k_index, weights, k_scale, q_pos, k_pos, row_len, start, n_q, workspace)
        grid = (triton.cdiv(n_q, rows), b)
        _select_kernel[grid](
            workspace, row_len, packed, start, n_q,
            workspace.stride(0), workspace.stride(1), packed.stride(0), packed.stride(1),
            K=topk, KP=kp, ROWS=rows, BLOCK=sel_block, num_warps=warps,
        )
        _sort_kernel[grid](
            packed, out_s, out_i, start, n_q,
            packed.stride(0), packed.stride(1), out_s.stride(0), out_s.stride(1),
            K=topk, KP=kp, ROWS=rows, num_warps=warps,
        )
    return out_s, out_i
