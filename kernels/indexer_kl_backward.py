"""Backward of the Triton indexer KL losses: gradients to q_index, k_index and weights (docs/design.md,
"Indexer losses"). The forward and the public API are in :mod:`kernels.indexer_kl`.

Per query row t (one program) and key block, with g_t the row's loss gradient, λ the indexer log-sum-exp and
Σp the row's target mass saved by the forward: G_s = g_t·((Σp)·softmax(I)_s − p_s) = dL/dI_s, then

    dw[t, j]   += Σ_s G_s ks_s ReLU(a_js)
    dq_I[t, j] += Σ_s c_js k_I[s]          with c_js = G_s ks_s w_j 1[a_js > 0] = dL/da_js
    dk_I[s]    += Σ_j c_js q_I[t, j]       (fp32 atomics: a key is shared by many queries)

Two kernels, chosen by :data:`KL_BWD_IMPL` (the same formulas; the tests cover both):

* ``"v2"`` (default), :func:`_kl_bwd_v2_kernel`: keys on the MMA M dimension. The pre-activations are
  s = k_I·q_Iᵀ [BLOCK_N, H_I]; dk_I = c·q_I is a [BLOCK_N, d_I] tile whose contiguous d_I axis is the MMA N axis,
  added with relaxed (``red``) vector atomics; dq_Iᵀ += k_Iᵀ·c [d_I, H_I] (M = d_I ≥ 64 keeps the Hopper MMA
  shape even for 8 indexer heads). The dots take the *inputs'* precision, as PyTorch's matmul would: bf16 (and
  fp8, upcast exactly) → bf16 operands, c rounded to bf16, fp32 accumulation; fp16 likewise; fp32 → exact fp32
  dots ("ieee", as the forward computes the logits). Sparse tiles: :data:`KL_BWD_V2_TILES`.
* ``"legacy"``, :func:`_kl_bwd_kernel`: indexer heads on M, every gradient dot in fp32 (3xTF32), 32-key blocks;
  kept selectable so one benchmark run can time both (``benchmarks/indexer_kl.py --compare-legacy``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.indexer_kl_tiles import _index_tile, _index_tile_keys_m, _key_block, _operand, _target_tile

#: Which backward kernel :func:`indexer_grads` launches: ``"v2"`` or ``"legacy"`` (see the module docstring).
KL_BWD_IMPL = "v2"
IMPLS = ("v2", "legacy")
#: The v2 kernel's launch on the GPU, sparse path: keys per block, warps, software-pipeline stages. Compiled
#: for sm_90 (Triton 3.6), 64/4/1 holds 255 registers at V3.2 (2 programs per SM) and 122 at the small shape;
#: 2 stages would prefetch the next block's indices and key rows (82 KB shared memory at V3.2).
#: ``benchmarks/indexer_kl.py --v2-sweep`` times the alternatives.
KL_BWD_V2_TILES = {"block_n": 64, "num_warps": 4, "num_stages": 1}
#: The alternatives the benchmark times (each compiles for sm_90 with at most ~100 bytes of spills; the GPU tests
#: check each against float64).
KL_BWD_V2_SWEEP = [{"block_n": n, "num_warps": w, "num_stages": st} for n, w, st in
                   ((64, 4, 1), (64, 4, 2), (64, 8, 1), (64, 8, 2), (32, 4, 1), (128, 8, 1))]


@triton.jit
def _kl_bwd_kernel(
    q_ptr, k_ptr, lse_ptr, qi_ptr, ki_ptr, w_ptr, ks_ptr, idx_ptr, qpos_ptr, kpos_ptr, rowlen_ptr,
    p_ptr, lsei_ptr, psum_ptr, grow_ptr, dqi_ptr, dki_ptr, dw_ptr,
    n_q, n_k, n_slots, scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_lb, stride_lt,
    stride_qib, stride_qit, stride_qih, stride_kib, stride_kit, stride_wb, stride_wt, stride_ksb,
    stride_ib, stride_it,
    H: tl.constexpr, HG: tl.constexpr, HGP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr, HAS_KSCALE: tl.constexpr, UPCAST_MAIN: tl.constexpr, IEEE_MAIN: tl.constexpr,
    UPCAST_IDX: tl.constexpr, IEEE_IDX: tl.constexpr, PREC: tl.constexpr,
):
    """The legacy kernel (``KL_BWD_IMPL = "legacy"``): indexer heads on M, fp32 gradient dots with precision PREC
    (3xTF32 on the GPU), dk_I added as a [d_I, BLOCK_N] tile with acq_rel atomics (the default ordering)."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    jj = tl.arange(0, HIP)
    dd = tl.arange(0, DIP)
    qi = tl.load(qi_ptr + b * stride_qib + t * stride_qit + jj[:, None] * stride_qih + dd[None, :],
                 mask=(jj < HI)[:, None] & (dd < DI)[None, :], other=0.0)
    if UPCAST_IDX:
        qi = qi.to(tl.float32)
    qi32 = qi.to(tl.float32)
    w = tl.load(w_ptr + b * stride_wb + t * stride_wt + jj, mask=jj < HI, other=0.0)
    g = tl.load(grow_ptr + b * n_q + t)
    lse_i = tl.load(lsei_ptr + b * n_q + t)
    lse_i = tl.where(lse_i > float("-inf"), lse_i, 0.0)  # a row without valid keys has no gradient anyway
    p_tot = tl.load(psum_ptr + b * n_q + t)
    if SPARSE:
        n_end = n_slots
        qpos = 0
    else:
        n_end = tl.load(rowlen_ptr + t)
        qpos = tl.load(qpos_ptr + t)
    dq_t = tl.zeros([DIP, HIP], dtype=tl.float32)  # dq_I transposed: see the dots below
    dw = tl.zeros([HIP], dtype=tl.float32)
    qi32_t = tl.trans(qi32)  # [DIP, HIP]
    for n0 in range(0, n_end, BLOCK_N):
        sl, kid, valid = _key_block(idx_ptr, kpos_ptr, b, t, n0, n_k, n_slots, qpos, stride_ib, stride_it,
                                    BLOCK_N, SPARSE)
        if SPARSE:
            p = tl.load(p_ptr + (b * n_q + t) * n_slots + sl, mask=sl < n_slots, other=0.0)
        else:
            p = _target_tile(q_ptr, k_ptr, lse_ptr, b, t, kid, valid, scale, stride_qb, stride_qt, stride_qh,
                             stride_kb, stride_kt, stride_kh, stride_lb, stride_lt,
                             H, HG, HGP, HKV, D, DC, BLOCK_N, UPCAST_MAIN, IEEE_MAIN)
        a, logits, kt, ksv = _index_tile(qi, w, ki_ptr, ks_ptr, b, kid, valid, stride_kib, stride_kit, stride_ksb,
                                         DI, DIP, BLOCK_N, HAS_KSCALE, UPCAST_IDX, IEEE_IDX)
        soft = tl.where(valid, tl.exp(tl.where(valid, logits, 0.0) - lse_i), 0.0)
        grad_i = tl.where(valid, g * (p_tot * soft - p), 0.0)  # dL/dI for this row's keys
        gt = grad_i * ksv
        dw += tl.sum(tl.maximum(a, 0.0) * gt[None, :], axis=1)
        coef = tl.where(a > 0, w[:, None] * gt[None, :], 0.0)  # [HIP, BLOCK_N] = dL/da
        # coef enters both dots as the B operand (shared memory): as the register A operand Triton 3.6 pushed its
        # layout into the elementwise producers and failed to lower that (applyLinearLayout assertion, H100).
        dq_t += tl.dot(tl.trans(kt.to(tl.float32)), tl.trans(coef), input_precision=PREC)  # [DIP, HIP]
        dk_t = tl.dot(qi32_t, coef, input_precision=PREC)  # [DIP, BLOCK_N]
        tl.atomic_add(dki_ptr + (b * n_k + kid[None, :]) * DI + dd[:, None], dk_t,
                      mask=valid[None, :] & (dd < DI)[:, None])
    tl.store(dqi_ptr + ((b * n_q + t) * HI + jj[None, :]) * DI + dd[:, None], dq_t,
             mask=(jj < HI)[None, :] & (dd < DI)[:, None])
    tl.store(dw_ptr + (b * n_q + t) * HI + jj, dw, mask=jj < HI)


@triton.jit
def _kl_bwd_v2_kernel(
    q_ptr, k_ptr, lse_ptr, qi_ptr, ki_ptr, w_ptr, ks_ptr, idx_ptr, qpos_ptr, kpos_ptr, rowlen_ptr,
    p_ptr, lsei_ptr, psum_ptr, grow_ptr, dqi_ptr, dki_ptr, dw_ptr,
    n_q, n_k, n_slots, scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_lb, stride_lt,
    stride_qib, stride_qit, stride_qih, stride_kib, stride_kit, stride_wb, stride_wt, stride_ksb,
    stride_ib, stride_it,
    H: tl.constexpr, HG: tl.constexpr, HGP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr, HAS_KSCALE: tl.constexpr, UPCAST_MAIN: tl.constexpr, IEEE_MAIN: tl.constexpr,
    UPCAST_IDX: tl.constexpr, IEEE_IDX: tl.constexpr, PREC: tl.constexpr,
    GRAD: tl.constexpr, UPCAST_GRAD: tl.constexpr,
):
    """One query row per program: dq_I [H_I, d_I] and dw [H_I] stored, dk_I added (see the module docstring).
    GRAD: the operand dtype of the three indexer dots ("bf16", "fp16", "fp32"); UPCAST_GRAD: hold those operands
    in fp32 (interpreter); PREC: the dots' input precision (fp32 operands). UPCAST_IDX / IEEE_IDX are unused."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    jj = tl.arange(0, HIP)
    dd = tl.arange(0, DIP)
    qi = tl.load(qi_ptr + b * stride_qib + t * stride_qit + jj[:, None] * stride_qih + dd[None, :],
                 mask=(jj < HI)[:, None] & (dd < DI)[None, :], other=0.0)  # [HIP, DIP], stays on chip
    qi = _operand(qi, GRAD, UPCAST_GRAD)
    w = tl.load(w_ptr + b * stride_wb + t * stride_wt + jj, mask=jj < HI, other=0.0)
    g = tl.load(grow_ptr + b * n_q + t)
    lse_i = tl.load(lsei_ptr + b * n_q + t)
    lse_i = tl.where(lse_i > float("-inf"), lse_i, 0.0)  # a row without valid keys has no gradient anyway
    p_tot = tl.load(psum_ptr + b * n_q + t)
    if SPARSE:
        n_end = n_slots
        qpos = 0
    else:
        n_end = tl.load(rowlen_ptr + t)
        qpos = tl.load(qpos_ptr + t)
    dq_t = tl.zeros([DIP, HIP], dtype=tl.float32)  # dq_I transposed: M = d_I, N = H_I
    dw = tl.zeros([HIP], dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        sl, kid, valid = _key_block(idx_ptr, kpos_ptr, b, t, n0, n_k, n_slots, qpos, stride_ib, stride_it,
                                    BLOCK_N, SPARSE)
        if SPARSE:
            p = tl.load(p_ptr + (b * n_q + t) * n_slots + sl, mask=sl < n_slots, other=0.0)
        else:
            p = _target_tile(q_ptr, k_ptr, lse_ptr, b, t, kid, valid, scale, stride_qb, stride_qt, stride_qh,
                             stride_kb, stride_kt, stride_kh, stride_lb, stride_lt,
                             H, HG, HGP, HKV, D, DC, BLOCK_N, UPCAST_MAIN, IEEE_MAIN)
        s, logits, kt, ksv = _index_tile_keys_m(qi, w, ki_ptr, ks_ptr, b, kid, valid, stride_kib, stride_kit,
                                                stride_ksb, DI, DIP, BLOCK_N, HAS_KSCALE, GRAD, UPCAST_GRAD, PREC)
        soft = tl.where(valid, tl.exp(tl.where(valid, logits, 0.0) - lse_i), 0.0)
        gt = tl.where(valid, g * (p_tot * soft - p), 0.0) * ksv  # dL/dI · ks for this row's keys
        dw += tl.sum(tl.maximum(s, 0.0) * gt[:, None], axis=0)
        coef = _operand(tl.where(s > 0, gt[:, None] * w[None, :], 0.0), GRAD, UPCAST_GRAD)  # [BLOCK_N, HIP] = dL/daᵀ
        dk = tl.dot(coef, qi, input_precision=PREC)  # [BLOCK_N, DIP]: d_I contiguous per thread → vector atomics
        dq_t += tl.dot(tl.trans(kt), coef, input_precision=PREC)  # [DIP, HIP]
        # relaxed: nothing reads dk_I before the kernel ends, so no ordering is needed (lowers to `red`)
        tl.atomic_add(dki_ptr + (b * n_k + kid[:, None]) * DI + dd[None, :], dk,
                      mask=valid[:, None] & (dd < DI)[None, :], sem="relaxed")
    tl.store(dqi_ptr + ((b * n_q + t) * HI + jj[None, :]) * DI + dd[:, None], dq_t,
             mask=(jj < HI)[None, :] & (dd < DI)[:, None])
    tl.store(dw_ptr + (b * n_q + t) * HI + jj, dw, mask=jj < HI)


# ----------------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------------
def grad_dtype(index_dtype: torch.dtype) -> str:
    """The v2 backward's dot operand dtype for indexer inputs of ``index_dtype`` (what PyTorch's matmul would use;
    fp8 has no PyTorch matmul and goes to bf16, which holds it exactly)."""
    if index_dtype == torch.float32:
        return "fp32"
    return "fp16" if index_dtype == torch.float16 else "bf16"


def indexer_grads(launch, p_buf: torch.Tensor, lse_i: torch.Tensor, p_tot: torch.Tensor, g_rows: torch.Tensor,
                  scale: float, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq_I [B, Lq, H_I, d_I], dk_I [B, Lk, d_I], dw [B, Lq, H_I] (fp32) for row gradients ``g_rows`` [B, Lq].

    ``launch``: what :func:`kernels.indexer_kl._launch` prepared (kernel arguments, strides, constexprs, warps,
    sizes); ``p_buf`` the saved target on the slots (sparse) or a placeholder (dense: p is recomputed);
    ``lse_i`` / ``p_tot`` the forward's per-row indexer log-sum-exp and target mass. ``impl``: "v2" or "legacy"
    (default :data:`KL_BWD_IMPL`).
    """
    impl = KL_BWD_IMPL if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"KL backward impl must be one of {IMPLS}, got {impl!r} (kernels.indexer_kl_backward."
                         "KL_BWD_IMPL)")
    args, strides, meta, warps, (b, lq, lk, hi, di, n_slots) = launch
    dev = lse_i.device
    on_gpu = dev.type == "cuda"
    dqi = torch.empty(b, lq, hi, di, dtype=torch.float32, device=dev)
    dki = torch.zeros(b, lk, di, dtype=torch.float32, device=dev)
    dw = torch.empty(b, lq, hi, dtype=torch.float32, device=dev)
    if not lq:
        return dqi, dki, dw
    common = (*args, p_buf, lse_i, p_tot, g_rows, dqi, dki, dw, lq, lk, n_slots, scale, *strides)
    if impl == "legacy":
        _kl_bwd_kernel[(lq, b)](*common, num_warps=warps, num_stages=1, PREC="tf32x3" if on_gpu else "ieee",
                                **meta)
        return dqi, dki, dw
    grad = grad_dtype(args[3].dtype)  # args[3]: q_index as the kernels read it
    upcast = grad == "bf16" and not on_gpu  # the interpreter's bf16 dot is wrong: bf16 values held in fp32
    fp32_ops = grad == "fp32" or upcast
    # fp32 operands: exact fp32 dots ("ieee"), as the forward computes the logits (IEEE_IDX) — recomputing them
    # in 3xTF32 moved the softmax against the forward's log-sum-exp: gradients 6× plain fp32 torch's error (H100).
    # "tf32" is ignored by 16-bit dots.
    prec = "ieee" if fp32_ops else "tf32"
    # The dense path keeps the forward's tiles: its cost is the target recompute (H·d per pair), whose unrolled
    # head-group dots cannot take pipeline stages (shared memory; see kernels.indexer_kl._launch).
    tiles = KL_BWD_V2_TILES if on_gpu and meta["SPARSE"] else {"block_n": meta["BLOCK_N"], "num_warps": warps,
                                                              "num_stages": 1}
    _kl_bwd_v2_kernel[(lq, b)](*common, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], PREC=prec,
                               GRAD=grad, UPCAST_GRAD=upcast, **{**meta, "BLOCK_N": tiles["block_n"]})
    return dqi, dki, dw
