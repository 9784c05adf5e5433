"""The exact top-k selection of the FP8 lightning indexer (docs/design.md, "Top-k"): steps 2 and 3 of
:mod:`kernels.indexer_topk`, which scores a chunk of queries into an fp32 workspace and calls :func:`select_chunk`.

- ``_select_kernel`` — one program per workspace row, exact: a threshold-counting fast path (row statistics, 8
  thresholds around the Gaussian tail quantile of rank ~1.5·k, counting passes), else the radix path (256-bin
  levels until the boundary bucket fits CAP = 2·next_pow2(k)); the ≤ CAP candidates at or above the threshold
  are compacted as int64 words (score key high, ``2^31−1−index`` low), so ties at the k-th score are all kept.
- ``_sort_kernel`` — one program per row sorts its candidate words descending: exactly (score desc, index asc),
  ties → lowest index; unpacks the first k.

Kept apart from the scoring so each file reads as one concept; the module docstring of
:mod:`kernels.indexer_topk` has the whole design and the measured costs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INT64_MIN = -(2**63)
INT64_MIN_C: tl.constexpr = tl.constexpr(INT64_MIN)  # empty slot in the packed buffer (sorts last)
N_THRESH: tl.constexpr = tl.constexpr(8)  # thresholds counted per pass by the select fast path
MAX_COUNT_PASSES: tl.constexpr = tl.constexpr(3)  # counting passes before the exact radix fallback


@triton.jit
def _ordered_key(x):
    """uint32 whose unsigned order is the float order of fp32 ``x`` (−inf → 0x007FFFFF)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)


# ----------------------------------------------------------------------------------------------------------------
# 2. exact radix select of each row's k largest (ties → lowest index), packed as int64
# ----------------------------------------------------------------------------------------------------------------
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
def _normal_upper_quantile(pt):
    """z with P(N(0,1) > z) = pt (Abramowitz–Stegun 26.2.23, |error| < 5e-4; plenty for a first guess)."""
    p = tl.where(pt < 0.5, pt, 1.0 - pt)
    r = tl.sqrt(-2.0 * tl.log(p))
    z = r - (2.515517 + 0.802853 * r + 0.010328 * r * r) / (1.0 + 1.432788 * r + 0.189269 * r * r
                                                           + 0.001308 * r * r * r)
    return tl.where(pt < 0.5, z, -z)


@triton.jit
def _count_at_least(row_ptr, n, n_max, thr, ROWS: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr):
    """count(x ≥ thr_j) per row for G thresholds ``thr`` [ROWS, G] → [ROWS, G] int32 (−inf entries never count)."""
    # Compare order-preserving keys, exactly as the compaction pass selects (−0.0 and +0.0 stay distinct).
    tkey = _ordered_key(thr)
    cnt = tl.zeros([ROWS, G], dtype=tl.int32)
    for start in range(0, n_max, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr[:, None] + offs[None, :], mask=offs[None, :] < n[:, None], other=float("-inf"))
        cnt += tl.sum((_ordered_key(x)[:, :, None] >= tkey[:, None, :]).to(tl.int32), axis=1)
    return cnt


@triton.jit
def _select_kernel(
    ws_ptr, nrow_ptr, slot_ptr, cnt_ptr, cand_ptr,
    q_start, n_q, stride_cnt, stride_nb,
    stride_wsb, stride_wst, stride_cb, stride_ct,
    K: tl.constexpr, CAP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_q
    b = tl.program_id(1).to(tl.int64)
    # Scores of row r live in ws[b, r, :n]; entries ≥ n are never read. Padding rows get n = 0.
    n = tl.load(nrow_ptr + b * stride_nb + q_start + rows, mask=row_ok, other=0)
    n_max = tl.max(n, axis=0)
    row_ptr = ws_ptr + b * stride_wsb + rows.to(tl.int64) * stride_wst  # [ROWS]
    cand_row = cand_ptr + b * stride_cb + rows.to(tl.int64) * stride_ct
    bins = tl.arange(0, 256)

    # The candidates are every valid entry whose key, shifted right by `shift`, is ≥ `prefix` (`taken` of them),
    # except for rows that end in the exact-tie case (`ranked`), which take only the first `quota` entries equal
    # to the prefix. Start from "all valid": shift 0, prefix = key(−inf) + 1.
    shift = tl.zeros([ROWS], dtype=tl.int32)
    prefix = tl.full([ROWS], 0x00800000, dtype=tl.uint32)
    if FAST:
        # Fast path: guess thresholds from the row's mean / std / max / min (a Gaussian tail quantile), count
        # the entries at or above each in one pass, and keep the highest threshold whose count lies in [K, CAP].
        # A few bracketing passes refine a bad guess; rows it cannot settle (heavy ties) fall through to radix.
        # Statistics pass: elementwise accumulators, reduced once at the end.
        a_n = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
        a_s = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        a_q = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        a_hi = tl.full([ROWS, BLOCK], float("-inf"), dtype=tl.float32)
        a_lo = tl.full([ROWS, BLOCK], float("inf"), dtype=tl.float32)
        for start in range(0, n_max, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr[:, None] + offs[None, :], mask=offs[None, :] < n[:, None], other=float("-inf"))
            ok_x = x != float("-inf")
            xv = tl.where(ok_x, x, 0.0)
            a_n += ok_x.to(tl.int32)
            a_s += xv
            a_q += xv * xv
            a_hi = tl.maximum(a_hi, x)
            a_lo = tl.minimum(a_lo, tl.where(ok_x, x, float("inf")))
        n_valid_i = tl.sum(a_n, axis=1)
        n_valid = n_valid_i.to(tl.float32)
        mean = tl.sum(a_s, axis=1) / tl.maximum(n_valid, 1.0)
        var = tl.sum(a_q, axis=1) / tl.maximum(n_valid, 1.0) - mean * mean
        sd = tl.sqrt(tl.maximum(var, 0.0))
        hi_v = tl.where(n_valid_i > 0, tl.max(a_hi, axis=1), 0.0)  # rows without valid entries: keep finite
        lo_v = tl.where(n_valid_i > 0, tl.min(a_lo, axis=1), 0.0)
        z = _normal_upper_quantile(tl.minimum(tl.maximum(1.5 * K / tl.maximum(n_valid, 1.0), 1e-6), 0.999))
        jj = tl.arange(0, N_THRESH)
        thr = mean[:, None] + sd[:, None] * (z[:, None] + (jj[None, :].to(tl.float32) - 3.5) * 0.3)
        thr = tl.minimum(tl.maximum(thr, lo_v[:, None]), hi_v[:, None])  # [ROWS, G] ascending
        found = n_valid_i <= CAP  # few valid: take them all
        t_sel = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        taken = tl.where(found, n_valid_i, 0)
        lo_b = lo_v  # bracket: count(x ≥ lo_b) > CAP, count(x ≥ hi_b) < K (as far as known)
        hi_b = hi_v
        passes = 0
        while (tl.min(found.to(tl.int32), axis=0) == 0) & (passes < MAX_COUNT_PASSES):
            cnt = _count_at_least(row_ptr, n, n_max, thr, ROWS, BLOCK, N_THRESH)
            good = (cnt >= K) & (cnt <= CAP)
            best = tl.max(tl.where(good, thr, float("-inf")), axis=1)
            ok = (~found) & (best > float("-inf"))
            t_sel = tl.where(ok, best, t_sel)
            taken = tl.where(ok, tl.max(tl.where(good & (thr == best[:, None]), cnt, 0), axis=1), taken)
            found = found | ok
            lo_b = tl.maximum(lo_b, tl.max(tl.where(cnt > CAP, thr, float("-inf")), axis=1))
            hi_b = tl.minimum(hi_b, tl.min(tl.where(cnt < K, thr, float("inf")), axis=1))
            thr = lo_b[:, None] + (hi_b - lo_b)[:, None] * ((jj[None, :] + 1).to(tl.float32) / (N_THRESH + 1))
            passes += 1
        fast_row = found & (n_valid_i > CAP)
        prefix = tl.where(fast_row, _ordered_key(t_sel), prefix)
    else:
        found = rows < 0
        taken = tl.zeros([ROWS], dtype=tl.int32)
    quota = tl.zeros([ROWS], dtype=tl.int32)
    ranked = tl.zeros([ROWS], dtype=tl.int1)

    if tl.min(found.to(tl.int32), axis=0) == 0:
        # Exact radix descent: narrow the boundary bucket 8 bits at a time until every entry at or above it fits
        # in CAP slots, or, with massive exact ties, down to the full key, taking the lowest-index equal ones.
        r_shift = tl.full([ROWS], 24, dtype=tl.int32)
        r_prefix = tl.zeros([ROWS], dtype=tl.uint32)
        hist = _histogram_pass(row_ptr, n, n_max, r_shift, r_prefix, ROWS, BLOCK)
        n_valid_r = tl.sum(hist, axis=1)
        take_all = n_valid_r <= CAP
        remaining = tl.minimum(n_valid_r, K)  # how many of the k are still to come from the bucket being refined
        above_all = tl.zeros([ROWS], dtype=tl.int32)  # entries strictly above the current bucket
        done = (take_all | found).to(tl.int32)
        while tl.min(done, axis=0) == 0:
            # boundary digit d: count(digit > d) < remaining ≤ count(digit ≥ d)
            ge = tl.cumsum(hist, axis=1, reverse=True)
            dsel = tl.max(tl.where(ge >= remaining[:, None], bins[None, :], -1), axis=1)
            above = tl.sum(tl.where(bins[None, :] > dsel[:, None], hist, 0), axis=1)
            in_bin = tl.sum(tl.where(bins[None, :] == dsel[:, None], hist, 0), axis=1)
            active = done == 0
            remaining = tl.where(active, remaining - above, remaining)
            above_all = tl.where(active, above_all + above, above_all)
            r_prefix = tl.where(active, (r_prefix << 8) | dsel.to(tl.uint32), r_prefix)
            fits = above_all + in_bin <= CAP
            ties = active & (r_shift == 0) & (~fits)
            quota = tl.where(ties, remaining, quota)
            ranked = ranked | ties
            taken = tl.where(active & fits, above_all + in_bin, tl.where(ties, above_all + remaining, taken))
            done = tl.where(active & (fits | (r_shift == 0)), 1, done)
            r_shift = tl.where(done == 0, r_shift - 8, r_shift)
            if tl.min(done, axis=0) == 0:
                hist = _histogram_pass(row_ptr, n, n_max, r_shift, r_prefix, ROWS, BLOCK)
        radix_row = (~found) & (~take_all)
        shift = tl.where(radix_row, r_shift, shift)
        prefix = tl.where(radix_row, r_prefix, prefix)
        taken = tl.where((~found) & take_all, n_valid_r, taken)

    if tl.max(ranked.to(tl.int32), axis=0) == 0:
        # Compaction in any order (the sort below fixes the order): one atomic slot counter per row.
        cnt_row = slot_ptr + b * stride_cnt + rows  # atomic slot counters (not the counts: see below)
        for start in range(0, n_max, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr[:, None] + offs[None, :], mask=offs[None, :] < n[:, None], other=float("-inf"))
            ukey = _ordered_key(x)
            sel = (x != float("-inf")) & ((ukey >> shift[:, None]) >= prefix[:, None])
            slot = tl.atomic_add(tl.broadcast_to(cnt_row[:, None], (ROWS, BLOCK)), 1, mask=sel)
            skey = (ukey ^ 0x80000000).to(tl.int32, bitcast=True)  # signed order = float order
            packed = (skey.to(tl.int64) << 32) | (2147483647 - offs[None, :]).to(tl.int64)
            # slot < CAP holds by the count above; the bound keeps a miscount from writing past the row.
            tl.store(cand_row[:, None] + slot, packed, mask=sel & (slot < CAP))
    else:
        # Exact ties at the k-th value: compact in ascending key order so the first `quota` equal ones are the
        # lowest indices, as the rule wants.
        t_cnt = tl.zeros([ROWS], dtype=tl.int32)
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
            sel = gt | (eq & ((eq_rank < quota[:, None]) | (~ranked[:, None])))
            sel_i = sel.to(tl.int32)
            pos = t_cnt[:, None] + tl.cumsum(sel_i, axis=1) - sel_i
            skey = (ukey ^ 0x80000000).to(tl.int32, bitcast=True)
            packed = (skey.to(tl.int64) << 32) | (2147483647 - offs[None, :]).to(tl.int64)
            tl.store(cand_row[:, None] + pos, packed, mask=sel)
            t_cnt += tl.sum(sel_i, axis=1)
            eq_seen += tl.sum(eq_i, axis=1)
    # The count goes to its own buffer: storing it over the slot counter raced with other threads' atomics still
    # in flight (seen on an H100: counts above CAP, so the sort read unwritten slots and returned indices ≥ Lk).
    tl.store(cnt_ptr + b * stride_cnt + rows, taken, mask=row_ok)  # number of candidates of each row


# ----------------------------------------------------------------------------------------------------------------
# 3. order each row's candidates by (score desc, index asc) and keep k
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _sort_kernel(
    cand_ptr, cnt_ptr, s_ptr, i_ptr,
    q_start, n_q, stride_cnt,
    stride_cb, stride_ct, stride_ob, stride_ot,
    K: tl.constexpr, CAP: tl.constexpr, ROWS: tl.constexpr, RANK_SORT: tl.constexpr, SKIP_EMPTY: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_q
    b = tl.program_id(1).to(tl.int64)
    taken = tl.load(cnt_ptr + b * stride_cnt + rows, mask=row_ok, other=0)
    if SKIP_EMPTY:
        # Rows without candidates keep what an earlier pass wrote (the filtered path's dense re-run of a few rows).
        row_ok = row_ok & (taken > 0)
        if tl.max(row_ok.to(tl.int32), axis=0) > 0:
            _sort_rows(cand_ptr, s_ptr, i_ptr, b, rows, row_ok, taken, q_start, stride_cb, stride_ct, stride_ob,
                       stride_ot, K, CAP, ROWS, RANK_SORT)
    else:
        _sort_rows(cand_ptr, s_ptr, i_ptr, b, rows, row_ok, taken, q_start, stride_cb, stride_ct, stride_ob,
                   stride_ot, K, CAP, ROWS, RANK_SORT)


@triton.jit
def _sort_rows(cand_ptr, s_ptr, i_ptr, b, rows, row_ok, taken, q_start, stride_cb, stride_ct, stride_ob, stride_ot,
               K: tl.constexpr, CAP: tl.constexpr, ROWS: tl.constexpr, RANK_SORT: tl.constexpr):
    slots = tl.arange(0, CAP)
    cand_row = cand_ptr + b * stride_cb + rows.to(tl.int64) * stride_ct
    p = tl.load(cand_row[:, None] + slots[None, :], mask=slots[None, :] < taken[:, None], other=INT64_MIN_C)
    # Descending int64 order of (score key, 2^31−1−index) is exactly (score desc, index asc).
    if RANK_SORT:
        # Interpreter: tl.sort's combine function runs per element in Python there; rank by pairwise compare.
        before = (p[:, None, :] > p[:, :, None]) | (
            (p[:, None, :] == p[:, :, None]) & (slots[None, None, :] < slots[None, :, None])
        )
        dest = tl.sum(before.to(tl.int32), axis=2)  # [ROWS, CAP] final slot of each candidate
    else:
        p = tl.sort(p, dim=1, descending=True)  # [ROWS, CAP]
        dest = tl.broadcast_to(slots[None, :], (ROWS, CAP))
    empty = p == INT64_MIN_C
    skey = (p >> 32).to(tl.int32)
    bits = skey ^ ((skey >> 31) & 0x7FFFFFFF)
    score = tl.where(empty, float("-inf"), bits.to(tl.float32, bitcast=True))
    idx = tl.where(empty, -1, 2147483647 - (p & 0xFFFFFFFF).to(tl.int32))
    t = (q_start + rows).to(tl.int64)
    out = b * stride_ob + t[:, None] * stride_ot + dest
    mask = row_ok[:, None] & (dest < K)
    tl.store(s_ptr + out, score, mask=mask)
    tl.store(i_ptr + out, idx, mask=mask)


def _as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` [n] (shared by the batch) or [B, n] (per sequence) → ([1 or B, n] contiguous, batch stride: 0 when
    shared, so a kernel reads row ``b * stride``)."""
    x = (x if x.dim() == 2 else x[None]).contiguous()
    return x, (x.stride(0) if x.shape[0] > 1 else 0)


def select_chunk(
    workspace: torch.Tensor,
    row_len: torch.Tensor,
    counters: torch.Tensor,
    cand: torch.Tensor,
    out_s: torch.Tensor,
    out_i: torch.Tensor,
    q_start: int,
    n_q: int,
    topk: int,
    fast: bool = True,
    config: dict | None = None,
    skip_empty: bool = False,
) -> None:
    """Exact top-k of workspace rows [0, n_q) into ``out_s/out_i[:, q_start:q_start+n_q]``.

    ``row_len`` [Lq] (shared) or [B, Lq] (per sequence): valid entries of each row; ``counters`` [2, B, ≥n_q]
    int32 zeros ([0]: atomic slot counters of the compaction, [1]: candidate counts); ``cand`` [B, ≥n_q, CAP]
    int64 scratch with CAP = 2·next_pow2(topk); ``fast``: threshold-counting path first (else radix only);
    ``skip_empty``: rows with no valid entry are left unwritten (see :func:`sort_chunk`).
    """
    b = workspace.shape[0]
    on_gpu = workspace.is_cuda
    # GPU: one row per program (its scalar control flow is per row), small blocks and 4 warps so that many
    # programs stream rows at once; the sort gets its own kernel (its registers would cap that occupancy).
    # Interpreter: batch rows to amortise the per-op cost.
    rows, block, warps = (1, 1024, 4) if on_gpu else (16, 64, 1)
    if config:
        block, warps = config.get("BLOCK", block), config.get("num_warps", warps)
    row_len, stride_nb = _as_rows(row_len)
    grid = (triton.cdiv(n_q, rows), b)
    _select_kernel[grid](
        workspace, row_len, counters[0], counters[1], cand, q_start, n_q, counters.stride(1), stride_nb,
        workspace.stride(0), workspace.stride(1), cand.stride(0), cand.stride(1),
        K=topk, CAP=cand.shape[-1], ROWS=rows, BLOCK=block, FAST=fast, num_warps=warps,
    )
    sort_chunk(cand, counters[1], out_s, out_i, q_start, n_q, topk, skip_empty)


def sort_chunk(cand: torch.Tensor, counts: torch.Tensor, out_s: torch.Tensor, out_i: torch.Tensor, q_start: int,
               n_q: int, topk: int, skip_empty: bool = False) -> None:
    """Order the candidates of rows [0, n_q) — ``cand`` [B, ≥n_q, CAP] int64 words, the first ``counts`` [B, ≥n_q]
    (int32, unit last stride; values past CAP read as CAP) of each row — by (score desc, index asc) and write the
    first k into ``out_s/out_i[:, q_start:q_start+n_q]``, (−inf, −1) past the row's candidates. ``skip_empty``:
    rows with no candidate are not written at all (and, one row per program on the GPU, not sorted)."""
    on_gpu = cand.is_cuda
    rows = 1 if on_gpu else 16
    _sort_kernel[(triton.cdiv(n_q, rows), cand.shape[0])](
        cand, counts, out_s, out_i, q_start, n_q, counts.stride(0),
        cand.stride(0), cand.stride(1), out_s.stride(0), out_s.stride(1),
        K=topk, CAP=cand.shape[-1], ROWS=rows, RANK_SORT=not on_gpu, SKIP_EMPTY=skip_empty,
        num_warps=8 if on_gpu else 1,
    )
