"""Threshold-filtered exact top-k of the FP8 lightning indexer (docs/design.md, "Top-k"): the score kernel keeps
only the scores at or above a per-row threshold, so the full fp32 score row is never written.

Selected by ``kernels.indexer_topk.SELECT_IMPL = "filter"`` (the dense-workspace path, ``"workspace"``, stays the
default until the GPU timings say otherwise). Same result, bit for bit, as the workspace path: the same scores from
the same FP8 MMA (one kernel, ``_score_kernel``, with a different epilogue), the same packed candidate words, the
same sort, ties → lowest index, (−inf, −1) padding. Per chunk of queries:

1. **Threshold estimate.** Every ``stride``-th key (odd stride, so power-of-two periodicities in the keys do not
   alias) is scored by the same kernel — 1/stride of the FLOPs — into a small [chunk, Lk/stride] workspace, and the
   existing exact select takes each row's top ``rank_max`` sample scores. Row t, with n causal keys of which m
   are sampled, gets the threshold ``t_row`` = its r-th largest sample score with r = round(target · m / n), so
   that count(score ≥ t_row) over all n keys is about ``target = sqrt(k · CAP)`` (≈ 1.41·k, the middle of
   [k, CAP] on a log scale; CAP = 2·next_pow2(k)). With r ≈ 64 sampled scores above it the count's relative spread
   is ≈ 1/sqrt(64) = 12.5%, against a window of ±35% (ln √2): ≈ 0.5% of the rows miss if the scores were
   Gaussian (cheap, see 3). Rows with at most CAP causal keys take all of them (t_row = −inf).
2. **Filtered scores.** ``_score_kernel`` with ``FILTER``: per key tile, compare with t_row; each hit reserves a
   slot with an atomic on its row's counter and stores its packed word (score key high, ``2^31−1−index`` low), as
   the select kernel's compaction does. No state crosses key tiles (earlier epilogues that carried accumulators
   slowed the scoring several-fold; benchmarks/NOTES_indexer.md). Every hit is counted, also past CAP.
3. **Exactness check and fallback.** The hits are every score ≥ t_row — a set closed upwards in the order
   (score desc, index asc), ties at any value all in or all out — so if k ≤ hits ≤ CAP (or t_row = −inf and
   hits ≤ CAP) the top-k of the candidates is the row's exact top-k: ``_sort_kernel`` orders them as today. The
   other rows (threshold too high: hits < k; too low, e.g. a plateau of exact zeros from the ReLU: hits > CAP)
   are re-run in the same chunk through the workspace path's kernels with per-row lengths that are 0 except
   for them: the score kernel skips query blocks without such a row, the select finds nothing in the others and
   the sort (``skip_empty``) leaves them as written. All on the device — **no host synchronisation**: when no
   row failed, these three launches find no work (a few µs).

Launches with fewer rows than :func:`kernels.indexer_topk.target_programs` (decode) keep the workspace path: it
has the key-split grids for that case.

Memory: the workspace path's chunking and its fp32 workspace (≤ 2 GiB, written only for failing rows' query
blocks), plus per chunk row 8·CAP + 4·Lk/stride bytes (candidates, sampled scores). Linear in L.
"""

from __future__ import annotations

import math

import torch
import triton

import kernels.indexer_topk as ik
from kernels.topk_select import _as_rows, select_chunk, sort_chunk

SAMPLE_RANK = 64  # sample scores above each row's threshold the stride is chosen for (spread ≈ 1/sqrt of it)
SAMPLE_STRIDE: int | None = None  # key sampling stride (None: from SAMPLE_RANK); tests force other values
TARGET_SCALE = 1.0  # expected hits = TARGET_SCALE · sqrt(k · CAP); tests force thresholds too high / too low
LAST_FALLBACK: torch.Tensor | None = None  # diagnostics (benchmark, tests): device int64 count of the (sequence,
# query) rows the last filtered call re-ran densely; reading it is a host sync, the op itself never reads it


def sample_stride(topk: int) -> int:
    """Odd key stride leaving about :data:`SAMPLE_RANK` sampled scores above a threshold of ≈ sqrt(k · CAP)
    hits (k = 2048: 45; k = 512: 11); :data:`SAMPLE_STRIDE` overrides."""
    if SAMPLE_STRIDE is not None:
        return SAMPLE_STRIDE
    cap = 2 * triton.next_power_of_2(topk)
    s = max(1, int(math.sqrt(topk * cap) / SAMPLE_RANK))
    return s if s % 2 else s - 1


class FilterPlan:
    """The buffers and steps of the filtered path for one call's prepared inputs (module docstring, steps 1–3).

    :func:`filtered_topk` runs ``thresholds``, ``scores``, ``sort`` and ``fallback`` per chunk; the benchmark
    times them one by one. Arguments as :func:`kernels.indexer_topk.workspace_topk`. Chunks are the workspace
    path's (``chunk_size``, else as many queries as fit the 2 GiB fp32 workspace), since the fallback rows of a
    chunk are re-scored into that workspace.
    """

    def __init__(self, q_index, k_index, weights, k_scale, q_pos, k_pos, row_len, topk: int,
                 chunk_size: int | None, out_s: torch.Tensor, out_i: torch.Tensor) -> None:
        self.inputs = (q_index, k_index, weights, k_scale, q_pos, k_pos, row_len)
        self.topk, self.out_s, self.out_i = topk, out_s, out_i
        b, lq = q_index.shape[:2]
        lk = k_index.shape[1]
        dev = q_index.device
        self.cap = cap = 2 * triton.next_power_of_2(topk)
        self.stride = stride = sample_stride(topk)
        self.target = TARGET_SCALE * math.sqrt(topk * cap)
        self.sampled = lk > cap  # else every row takes all its keys: no threshold to estimate
        m_w = triton.cdiv(lk, stride) if self.sampled else 0
        # r ≤ target · m / n with m ≤ n / stride + 1 and n > CAP for the rows that use it
        self.rank_max = max(1, min(m_w, math.ceil(self.target * (1 / stride + 1 / cap)) + 1))
        self.chunk = chunk = ik.workspace_chunk(b, lq, lk, chunk_size)
        self.cand = torch.empty(b, chunk, cap, dtype=torch.int64, device=dev)
        self.thr = torch.empty(b, chunk, dtype=torch.float32, device=dev)
        self.hits = torch.empty(b, chunk, dtype=torch.int32, device=dev)
        self.lens = _as_rows(row_len)[0]  # [1 or B, Lq]
        # the fallback: per (sequence, query) the row length where the check failed, else 0 (nothing to re-run)
        self.redo_len = torch.zeros(b, lq, dtype=torch.int32, device=dev)
        self.ws = torch.empty(b, chunk, max(1, lk), dtype=torch.float32, device=dev)
        self.counters = torch.empty(2, b, chunk, dtype=torch.int32, device=dev)
        self.n_redo = torch.zeros((), dtype=torch.int64, device=dev)
        if self.sampled:
            self.k_smp = _bytes_safe(k_index, lambda x: x[:, ::stride].contiguous())
            self.ks_smp = k_scale[:, ::stride].contiguous() if k_scale is not None else None
            self.kpos_smp = k_pos[::stride].contiguous()
            self.smp_lens = _as_rows(ik._row_lengths(q_pos, self.kpos_smp))[0]
            self.smp_ws = torch.empty(b, chunk, m_w, dtype=torch.float32, device=dev)
            self.smp_s = torch.empty(b, chunk, self.rank_max, dtype=torch.float32, device=dev)
            self.smp_i = torch.empty(b, chunk, self.rank_max, dtype=torch.int32, device=dev)
            self.smp_cand = torch.empty(b, chunk, 2 * triton.next_power_of_2(self.rank_max), dtype=torch.int64,
                                        device=dev)

    def thresholds(self, start: int, n_q: int) -> None:
        """Step 1: ``thr[:, :n_q]`` = each row's r-th largest sampled score (−inf for rows of ≤ CAP keys)."""
        if not self.sampled:
            self.thr.fill_(float("-inf"))
            return
        q_index, _, weights, _, q_pos, _, _ = self.inputs
        b = self.thr.shape[0]
        n = self.lens[:, start:start + n_q]
        m = self.smp_lens[:, start:start + n_q].contiguous()
        ik.score_chunk(q_index, self.k_smp, weights, self.ks_smp, q_pos, self.kpos_smp, self.smp_lens, start, n_q,
                       self.smp_ws)
        self.counters.zero_()
        select_chunk(self.smp_ws, m, self.counters, self.smp_cand, self.smp_s, self.smp_i, 0, n_q, self.rank_max,
                     ik.FAST_SELECT)
        r = torch.round(self.target * m / n.clamp_min(1)).long().clamp(1, self.rank_max)
        t = self.smp_s[:, :n_q].gather(-1, (r - 1).expand(b, n_q)[..., None])[..., 0]
        self.thr[:, :n_q] = torch.where(n <= self.cap, float("-inf"), t)

    def scores(self, start: int, n_q: int) -> None:
        """Step 2: the scores ≥ each row's threshold as candidate words, ``hits`` = how many."""
        q_index, k_index, weights, k_scale, q_pos, k_pos, row_len = self.inputs
        self.hits.zero_()
        ik.score_chunk(q_index, k_index, weights, k_scale, q_pos, k_pos, row_len, start, n_q, self.cand,
                       filter_rows=(self.thr, self.hits))

    def sort(self, start: int, n_q: int) -> None:
        """Step 3a: order each row's candidates and write its first k (rows failing the check are redone)."""
        sort_chunk(self.cand, self.hits, self.out_s, self.out_i, start, n_q, self.topk)

    def fallback(self, start: int, n_q: int) -> None:
        """Step 3b, on the device: rows whose hits lie outside [k, CAP] (or above CAP when every key was taken)
        are re-scored densely and selected exactly, over their own lengths; every other row gets length 0, so
        the score kernel skips query blocks without such a row, and the select and the sort (``skip_empty``)
        leave the rows that passed as step 3a wrote them. No host synchronisation: when no row failed these
        launches find no work."""
        q_index, k_index, weights, k_scale, q_pos, k_pos, _ = self.inputs
        h, t = self.hits[:, :n_q], self.thr[:, :n_q]
        failed = (h > self.cap) | ((h < self.topk) & (t != float("-inf")))  # [B, n_q]
        self.redo_len[:, start:start + n_q] = torch.where(failed, self.lens[:, start:start + n_q], 0)
        self.n_redo += failed.sum()
        ik.score_chunk(q_index, k_index, weights, k_scale, q_pos, k_pos, self.redo_len, start, n_q, self.ws)
        self.counters.zero_()
        select_chunk(self.ws, self.redo_len, self.counters, self.cand, self.out_s, self.out_i, start, n_q,
                     self.topk, ik.FAST_SELECT, skip_empty=True)


def filtered_topk(
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
    """Exact top-k of every query into ``out_s``/``out_i`` [B, Lq, k], by the filtered scoring (module docstring).

    Arguments as :func:`kernels.indexer_topk.workspace_topk` (prepared inputs, ``q_pos``/``row_len`` [Lq] or
    [B, Lq]). No host synchronisation. Sets :data:`LAST_FALLBACK`.
    """
    global LAST_FALLBACK
    plan = FilterPlan(q_index, k_index, weights, k_scale, q_pos, k_pos, row_len, topk, chunk_size, out_s, out_i)
    lq = q_index.shape[1]
    for start in range(0, lq, plan.chunk):
        n_q = min(plan.chunk, lq - start)
        plan.thresholds(start, n_q)
        plan.scores(start, n_q)
        plan.sort(start, n_q)
        plan.fallback(start, n_q)
    LAST_FALLBACK = plan.n_redo


def _bytes_safe(x: torch.Tensor, take) -> torch.Tensor:
    """``take(x)`` for a copy/gather; 1-byte (FP8) tensors go through a uint8 view, which every torch build indexes
    and copies (FP8 index kernels are newer than the dtype)."""
    return take(x.view(torch.uint8)).view(x.dtype) if x.element_size() == 1 else take(x)
