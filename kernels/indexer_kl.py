"""Triton indexer KL losses, forward and backward, streamed over keys (docs/design.md, "Indexer losses").

Same functions as :mod:`dsa_dist.ops.kl`:

    p[t, s]  = (1/H) Σ_h exp(scale · q_h[t] · k_g(h)[s] − lse_h[t])      (target, detached; g(h) = KV group)
    I[t, s]  = k_scale[s] · Σ_j w[t, j] · ReLU(q_I[t, j] · k_I[s])      (indexer logits)
    L_t      = Σ_{s: p > 0} p[t, s] · (log p[t, s] − log_softmax_s I[t, s])

over all causal keys (dense warm-up) or over the selected set S_t (sparse stage, ``topk_indices``).

One program per (query, batch) streams its keys in blocks of ``BLOCK_N`` — contiguous causal keys (dense) or
gathered rows of ``topk_indices`` (sparse) — so nothing of size [L, L] or [H, L, L] exists. The main-attention
heads of a KV group sit on the MMA M dimension (one gathered key block serves all of them), the indexer heads
likewise. A single pass suffices: with the running indexer log-sum-exp λ (online, from max and sum),

    L_t = Σ p · (log p − I + λ),

where the terms already summed are re-based whenever λ grows (they shift by (Σ p)·Δλ); each term is the
small, mixed-sign p·log(p/softmax), so nothing large cancels. Saved per row: LSE_I, Σ p (and, sparse
only, p on the k slots, so the backward need not recompute the main-attention logits; the dense backward
recomputes p). The backward (gradients of q_index, k_index, weights; ``k_scale`` gets none) is in
:mod:`kernels.indexer_kl_backward`; the shared tiles in :mod:`kernels.indexer_kl_tiles`.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from kernels._checks import (
    FLOAT_DTYPES,
    check_dim,
    check_indexer_inputs,
    check_launchable,
    check_positions,
    check_positive_int,
    check_reduction,
    check_same_batch,
    check_tensor,
)
from kernels.indexer_kl_backward import indexer_grads
from kernels.indexer_kl_tiles import _index_tile, _key_block, _target_tile
from kernels.indexer_topk import _row_lengths
from kernels.sparse_attention import check_sparse_inputs

Reduction = Literal["mean", "sum", "none"]


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _kl_fwd_kernel(
    q_ptr, k_ptr, lse_ptr, qi_ptr, ki_ptr, w_ptr, ks_ptr, idx_ptr, qpos_ptr, kpos_ptr, rowlen_ptr,
    p_ptr, kl_ptr, lsei_ptr, psum_ptr,
    n_q, n_k, n_slots, scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_lb, stride_lt,
    stride_qib, stride_qit, stride_qih, stride_kib, stride_kit, stride_wb, stride_wt, stride_ksb,
    stride_ib, stride_it,
    H: tl.constexpr, HG: tl.constexpr, HGP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr, HAS_KSCALE: tl.constexpr, UPCAST_MAIN: tl.constexpr, IEEE_MAIN: tl.constexpr,
    UPCAST_IDX: tl.constexpr, IEEE_IDX: tl.constexpr, P_GIVEN: tl.constexpr = False,
):
    """Per row: KL, indexer LSE and Σ p. P_GIVEN (sparse only): p is read from ``p_ptr`` (the fused attention's
    backward wrote it) instead of being rebuilt from q, k and lse; q, k, lse are then not read."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    jj = tl.arange(0, HIP)
    dd = tl.arange(0, DIP)
    qi = tl.load(qi_ptr + b * stride_qib + t * stride_qit + jj[:, None] * stride_qih + dd[None, :],
                 mask=(jj < HI)[:, None] & (dd < DI)[None, :], other=0.0)  # [HIP, DIP], stays on chip
    if UPCAST_IDX:
        qi = qi.to(tl.float32)
    w = tl.load(w_ptr + b * stride_wb + t * stride_wt + jj, mask=jj < HI, other=0.0)
    if SPARSE:
        n_end = n_slots
        qpos = 0
    else:
        n_end = tl.load(rowlen_ptr + t)
        qpos = tl.load(qpos_ptr + t)
    m = tl.full([], float("-inf"), dtype=tl.float32)  # running max of I
    l_sum = tl.zeros([], dtype=tl.float32)  # Σ exp(I − m)
    lse_run = tl.zeros([], dtype=tl.float32)  # running LSE of I (valid once p_tot > 0 or l_sum > 0)
    kl = tl.zeros([], dtype=tl.float32)  # Σ p (log p − I + lse_run): small, mixed-sign terms
    p_tot = tl.zeros([], dtype=tl.float32)  # Σ p
    for n0 in range(0, n_end, BLOCK_N):
        sl, kid, valid = _key_block(idx_ptr, kpos_ptr, b, t, n0, n_k, n_slots, qpos, stride_ib, stride_it,
                                    BLOCK_N, SPARSE)
        if P_GIVEN:
            p = tl.load(p_ptr + (b * n_q + t) * n_slots + sl, mask=sl < n_slots, other=0.0)
        else:
            p = _target_tile(q_ptr, k_ptr, lse_ptr, b, t, kid, valid, scale, stride_qb, stride_qt, stride_qh,
                             stride_kb, stride_kt, stride_kh, stride_lb, stride_lt,
                             H, HG, HGP, HKV, D, DC, BLOCK_N, UPCAST_MAIN, IEEE_MAIN)
        a, logits, kt, ksv = _index_tile(qi, w, ki_ptr, ks_ptr, b, kid, valid, stride_kib, stride_kit, stride_ksb,
                                         DI, DIP, BLOCK_N, HAS_KSCALE, UPCAST_IDX, IEEE_IDX)
        if SPARSE and not P_GIVEN:  # keep p for the backward: O(L·k), saves recomputing the main-attention logits
            tl.store(p_ptr + (b * n_q + t) * n_slots + sl, p, mask=sl < n_slots)
        m_new = tl.maximum(m, tl.max(logits, axis=0))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # no −inf − (−inf) before the first valid key
        seen = m > float("-inf")
        l_sum = l_sum * tl.exp(tl.where(seen, m - m_ref, 0.0))
        l_sum += tl.sum(tl.where(valid, tl.exp(logits - m_ref), 0.0), axis=0)
        lse_new = m_ref + tl.log(tl.where(l_sum > 0, l_sum, 1.0))
        # The terms so far were taken against the old LSE: shift them (Σp·ΔLSE), then add this block's. Keeping
        # each term p·(log p − log softmax) small avoids the cancellation of Σ p log p against Σ p·I.
        kl += p_tot * tl.where(seen, lse_new - lse_run, 0.0)
        pos = p > 0
        log_q = tl.where(valid, logits, 0.0) - lse_new
        kl += tl.sum(tl.where(pos, p * (tl.log(tl.where(pos, p, 1.0)) - log_q), 0.0), axis=0)
        p_tot += tl.sum(tl.where(pos, p, 0.0), axis=0)
        lse_run = lse_new
        m = m_new
    has = l_sum > 0
    tl.store(kl_ptr + b * n_q + t, tl.where(has, kl, 0.0))
    tl.store(lsei_ptr + b * n_q + t, tl.where(has, lse_run, float("-inf")))
    tl.store(psum_ptr + b * n_q + t, p_tot)



# ----------------------------------------------------------------------------------------------------------------
# wrapper
# ----------------------------------------------------------------------------------------------------------------
def _operands(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A common dot dtype for two operands: equal dtypes stay (fp8/fp16/bf16/fp32), anything else → fp32."""
    if x.dtype != y.dtype or x.dtype == torch.float64:
        x, y = x.float(), y.float()
    return (x if x.stride(-1) == 1 else x.contiguous()), (y if y.stride(-1) == 1 else y.contiguous())


def _flags(dtype: torch.dtype, on_gpu: bool) -> tuple[bool, bool]:
    """(UPCAST, IEEE): the interpreter's bf16 dot is wrong → upcast; fp32 operands → exact fp32 dot."""
    upcast = (not on_gpu) and dtype == torch.bfloat16
    return upcast, dtype == torch.float32 or upcast


def _launch(q_index, k_index, weights, q, k, attn_lse, k_scale, topk_indices, q_pos, k_pos, row_len, scale):
    """Kernel arguments, strides and constexprs shared by the forward and backward launches."""
    dev = q.device
    b, lq, h, d = q.shape
    lk, hkv = k_index.shape[1], k.shape[2]
    hi, di = q_index.shape[2], q_index.shape[3]
    qm, km = _operands(q.detach(), k.detach())
    qi, ki = _operands(q_index.detach(), k_index.detach())
    w = weights.detach().float().contiguous()
    ks = k_scale.detach().float().contiguous() if k_scale is not None else None
    lse = attn_lse.detach().float().contiguous()
    sparse = topk_indices is not None
    n_slots = topk_indices.shape[-1] if sparse else 0
    idx = topk_indices.contiguous() if sparse else row_len
    on_gpu = dev.type == "cuda"
    hg = h // hkv
    meta = {
        "H": h, "HG": hg, "HGP": max(16, triton.next_power_of_2(hg)), "HKV": hkv, "D": d,
        "DC": min(64, max(16, triton.next_power_of_2(d))), "HI": hi, "HIP": max(16, triton.next_power_of_2(hi)),
        "DI": di, "DIP": max(32, triton.next_power_of_2(di)), "BLOCK_N": 32 if on_gpu else 16,
        "SPARSE": sparse, "HAS_KSCALE": ks is not None,
    }
    meta["UPCAST_MAIN"], meta["IEEE_MAIN"] = _flags(qm.dtype, on_gpu)
    meta["UPCAST_IDX"], meta["IEEE_IDX"] = _flags(qi.dtype, on_gpu)
    args = (qm, km, lse, qi, ki, w, ks if ks is not None else w, idx, q_pos, k_pos, row_len)
    strides = (
        qm.stride(0), qm.stride(1), qm.stride(2), km.stride(0), km.stride(1), km.stride(2),
        lse.stride(0), lse.stride(1), qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1),
        w.stride(0), w.stride(1), (ks if ks is not None else w).stride(0),
        idx.stride(0) if sparse else 0, idx.stride(1) if sparse else 0,
    )
    # No software pipelining: the unrolled head-group / d-chunk dots would each get multi-stage shared
    # buffers (402 KB for d=576 on the H100, over its 227 KB).
    warps = 4 if on_gpu else 1
    return args, strides, meta, warps, (b, lq, lk, hi, di, n_slots)


def indexer_kl_sparse_from_target(
    target: torch.Tensor,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None,
    topk_indices: torch.Tensor,
    grad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The sparse KL for a given target p_attn [B, Lq, k] (fp32, e.g. written by the attention backward).

    Returns ``(kl, dq_index, dk_index, dweights)``: the mean KL over the B·Lq rows (fp32 scalar) and, when
    ``grad`` (the loss gradient of that mean) is given, its gradients w.r.t. the indexer inputs (fp32), exactly
    those of :func:`indexer_kl_loss_sparse` with the same target. Not differentiable itself: the fused op
    (:mod:`kernels.sparse_attention_kl`) calls it inside its backward.
    """
    b, lq, n_slots = target.shape
    dummy = target.new_zeros(1, 1, 1, 16)  # the main-attention operands, not read with P_GIVEN
    q_stub = dummy.expand(b, lq, 1, 16)
    launch = _launch(q_index, k_index, weights, q_stub, dummy, target.new_zeros(b, lq, 1), k_scale,
                     topk_indices, dummy, dummy, dummy, 1.0)
    args, strides, meta, warps, _ = launch
    p_buf = target.contiguous()
    kl_rows, lse_i, p_tot = (torch.empty(b, lq, dtype=torch.float32, device=target.device) for _ in range(3))
    if lq:
        _kl_fwd_kernel[(lq, b)](*args, p_buf, kl_rows, lse_i, p_tot, lq, k_index.shape[1], n_slots, 1.0,
                                *strides, num_warps=warps, num_stages=1, P_GIVEN=True, **meta)
    kl = kl_rows.mean()
    if grad is None:
        return kl, None, None, None
    g_rows = (grad.float() / max(1, b * lq)).expand(b, lq).contiguous()
    return (kl, *indexer_grads(launch, p_buf, lse_i, p_tot, g_rows, 1.0))


class _IndexerKL(torch.autograd.Function):
    """Autograd wrapper: inputs are the differentiable indexer tensors first, then everything else."""

    @staticmethod
    def forward(ctx, q_index, k_index, weights, q, k, attn_lse, k_scale, topk_indices, q_pos, k_pos, row_len,
                scale, reduction):
        launch = _launch(q_index, k_index, weights, q, k, attn_lse, k_scale, topk_indices, q_pos, k_pos, row_len,
                         scale)
        args, strides, meta, warps, (b, lq, lk, hi, di, n_slots) = launch
        dev = q.device
        kl_rows = torch.empty(b, lq, dtype=torch.float32, device=dev)
        lse_i = torch.empty_like(kl_rows)
        p_tot = torch.empty_like(kl_rows)
        p_buf = torch.empty(b, lq, n_slots, dtype=torch.float32, device=dev) if meta["SPARSE"] else kl_rows
        if lq:
            _kl_fwd_kernel[(lq, b)](*args, p_buf, kl_rows, lse_i, p_tot, lq, lk, n_slots, scale, *strides,
                                    num_warps=warps, num_stages=1, **meta)
        ctx.save_for_backward(q_index, k_index, weights, p_buf, lse_i, p_tot)
        ctx.launch, ctx.scale = launch, scale
        ctx.reduction = reduction
        return _reduce(kl_rows, reduction)

    @staticmethod
    def backward(ctx, grad):
        q_index, k_index, weights, p_buf, lse_i, p_tot = ctx.saved_tensors
        b, lq = ctx.launch[4][:2]
        if ctx.reduction == "mean":
            g_rows = (grad.float() / max(1, b * lq)).expand(b, lq).contiguous()
        elif ctx.reduction == "sum":
            g_rows = grad.float().expand(b, lq).contiguous()
        else:
            g_rows = grad.float().contiguous()
        dqi, dki, dw = indexer_grads(ctx.launch, p_buf, lse_i, p_tot, g_rows, ctx.scale)
        return (dqi.to(q_index.dtype), dki.to(k_index.dtype), dw.to(weights.dtype),
                None, None, None, None, None, None, None, None, None, None)


def _reduce(per_row: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    return per_row.sum() if reduction == "sum" else per_row


def _check_common(q, k, q_index, k_index, weights, k_scale, attn_lse, reduction, chunk_size) -> None:
    """Checks shared by both losses: the indexer inputs belong to q's batch and rows, k's keys; attn_lse given."""
    check_indexer_inputs(q_index, k_index, weights, k_scale)
    check_same_batch("q", q, q_index=q_index, k_index=k_index)
    check_dim("q_index", q_index, 1, q.shape[1], "query length, as in q")
    check_dim("k_index", k_index, 1, k.shape[1], "key length, as in k")
    if attn_lse is None:
        raise ValueError(
            "attn_lse is required by the Triton indexer KL: pass the log-sum-exp the attention returns "
            "(out, attn_lse = dense_attention(...) for the dense loss, sparse_attention(...) for the sparse one)"
        )
    check_tensor("attn_lse", attn_lse, ndim=3, dtypes=(torch.float32, torch.float64))
    if attn_lse.shape != q.shape[:3]:
        raise ValueError(f"attn_lse must be [B, Lq, H] = {tuple(q.shape[:3])} as q's first dims, "
                         f"got {tuple(attn_lse.shape)}")
    check_reduction(reduction)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    check_launchable(_kl_fwd_kernel, q)


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
    chunk_size: int | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Dense warm-up KL(p ‖ softmax(I)) over all causal keys, streamed over key blocks.

    Args:
        q: [B, Lq, H, d] main-attention queries; k: [B, Lk, Hkv, d] keys (H a multiple of Hkv; detached).
        q_index: [B, Lq, H_I, d_I], k_index: [B, Lk, d_I] (e4m3, fp16, bf16 or fp32), weights: [B, Lq, H_I],
        k_scale: [B, Lk] or None — the indexer inputs, as for ``lightning_indexer_scores``.
        attn_lse: [B, Lq, H] log-sum-exp of the dense attention — required (the attention returns it).
        q_positions / k_positions: [Lq] / [Lk] global positions for the causal rule.
        chunk_size: accepted for signature compatibility (the kernel streams keys itself).
        reduction: over the B·Lq query rows: 'mean', 'sum' or 'none' ([B, Lq]).

    Returns the loss (fp32); gradients flow to ``q_index``, ``k_index`` and ``weights`` only.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    b, lq, h, d = q.shape
    check_same_batch("q", q, k=k)
    check_dim("k", k, 3, d, "d_qk, as in q")
    if h % k.shape[2]:
        raise ValueError(f"q heads ({h}) must be a multiple of k heads ({k.shape[2]})")
    _check_common(q, k, q_index, k_index, weights, k_scale, attn_lse, reduction, chunk_size)
    q_pos = check_positions("q_positions", q_positions, lq, q.device)
    k_pos = check_positions("k_positions", k_positions, k.shape[1], q.device)
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    return _IndexerKL.apply(q_index, k_index, weights, q, k, attn_lse, k_scale, None, q_pos, k_pos,
                            _row_lengths(q_pos, k_pos), scale, reduction)


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
    chunk_size: int | None = None,
    reduction: Reduction = "mean",
    indices_checked: bool = False,
) -> torch.Tensor:
    """Sparse-stage KL on the selected set S_t only, target from the sparse attention's log-sum-exp.

    Args as :func:`indexer_kl_loss_dense`, plus ``topk_indices`` [B, Lq, k] int32/int64 (shared by all heads,
    −1 = empty slot, else a row of k) and ``attn_lse`` [B, Lq, H] from the sparse attention (required).
    ``indices_checked``: the caller guarantees the index range (our own top-k, validated replays); the device-side
    range check is skipped, as in :func:`kernels.sparse_attention.sparse_attention`.
    Extra memory: p on the slots, 4·B·Lq·k bytes, kept for the backward.
    """
    # the sparse attention's checks (shapes, devices, index range), with a one-dim view of k standing in for v
    check_sparse_inputs(q, k, k[..., :1], topk_indices, dtypes=FLOAT_DTYPES, indices_checked=indices_checked)
    if topk_indices.dim() != 3:
        raise ValueError(f"topk_indices must be [B, Lq, k] for the indexer KL, got {tuple(topk_indices.shape)}")
    _check_common(q, k, q_index, k_index, weights, k_scale, attn_lse, reduction, chunk_size)
    lq = q.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q_pos = torch.zeros(1, dtype=torch.int64, device=q.device)  # unused in the sparse mode
    return _IndexerKL.apply(q_index, k_index, weights, q, k, attn_lse, k_scale, topk_indices, q_pos, q_pos,
                            torch.zeros(max(lq, 1), dtype=torch.int32, device=q.device), scale, reduction)
