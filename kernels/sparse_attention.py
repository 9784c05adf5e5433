"""Triton sparse attention over per-query top-k key sets, forward and backward (docs/design.md, "Sparse attention").

    u_t = softmax_{s ∈ S_t}(scale · q_t·K[s]) V[s]

Same signature and semantics as the reference :func:`dsa_dist.ops.sparse_attention.sparse_attention`.
Layout of the work (shaped like Triton's fused-attention tutorial):

* One program per (token, KV group, block of ``BLOCK_H`` query heads of that group). The group's heads sit on
  the MMA M dimension, so one gathered block of ``BLOCK_N`` key rows feeds every head at once: MLA in absorbed
  (MQA) mode has ``Hkv = 1`` and all 128 heads share the block; GQA puts the ``H / Hkv`` heads of a group on M,
  padded to 16 rows for ``tl.dot``.
* ``d_qk`` need not be a power of two: it is split as ``D1 + D2`` (largest power of two + rest), e.g. 576 =
  512 + 64 (latent + rope), 192 = 128 + 64, and both halves are dotted separately.
* MLA absorbed mode passes ``v = k[..., :512]`` (a view of the same latent). Then V is read from the K tile
  already in registers/shared memory (``V_IS_K``), and in backward dV is folded into dK's atomics (one fp32
  atomic per latent element instead of two); v's own gradient is returned as ``None`` and the sum reaches the
  shared latent through autograd.
* Backward = three launches (the ``@triton.jit`` code is in :mod:`kernels.sparse_attention_backward`):
  delta = rowsum(dO ⊙ O); a dq pass shaped like the forward (dq accumulates in
  registers, no atomics: a program owns its token's heads); a dk/dv pass with the selected keys on M and all
  heads of the group on N, operands streamed in 128-wide d-chunks, each chunk of dK/dV added with fp32 atomics
  (keys are shared by many queries and there is no cheap transpose of the index lists), then cast. A single
  fused kernel needs 279–385 KB of shared memory at 576/512 (benchmarks/NOTES_sparse_attention.md).
* ``WRITE_P`` (dq pass): also store the head-mean of the recomputed P tiles, the sparse indexer KL's target
  (used by :mod:`kernels.sparse_attention_kl`; compiled out of the plain backward).
* ``UPCAST`` converts dot operands to fp32 first: Triton's CPU interpreter gets bf16×bf16 ``tl.dot`` wrong
  (docs/design.md, "Testing"), so bf16 runs there upcast; on GPU bf16 operands go to the tensor cores with fp32
  accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._checks import (
    check_dim,
    check_index_range,
    check_launchable,
    check_same_batch,
    check_same_device,
    check_tensor,
)
from kernels.sparse_attention_backward import (
    _sparse_attn_bwd_delta_kernel,
    _sparse_attn_bwd_dkv_kernel,
    _sparse_attn_bwd_dq_kernel,
    _sparse_attn_bwd_mixed_kernel,
)

_LOG2E = 1.4426950408889634
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIXED_BACKWARD = True  # one launch with the dq and dk/dv programs interleaved (see _sparse_attn_bwd_mixed_kernel);
# used when both passes run and their tile configs use the same number of warps. Measured on an H100 (V3.2 shape):
# 6-7 % faster at 128K, 3 % at 32K (benchmarks/NOTES_sparse_attention.md §8); False: two launches.


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _sparse_attn_fwd_kernel(
    Q, K, V, IDX, OUT, LSE,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_ib, s_il, s_ih, s_ik,
    s_ob, s_ol, s_oh, s_od,
    s_lb, s_ll, s_lh,
    LQ, TOPK, GROUP, HEAD_BLOCKS, NUM_HB, qk_scale_log2,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    V_IS_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_H >= 16)
    tl.static_assert((not V_IS_K) or (DV == D1 and DVP == D1))
    # 1-D grid, head blocks of one token adjacent: they gather the same KV rows, which then hit in L2.
    pid = tl.program_id(0).to(tl.int64)
    pid_t = pid // NUM_HB
    pid_h = pid % NUM_HB
    b = pid_t // LQ
    t = pid_t % LQ
    g = pid_h // HEAD_BLOCKS  # KV group
    hb = pid_h % HEAD_BLOCKS
    offs_hg = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # head within the group
    h_mask = offs_hg < GROUP
    heads = (g * GROUP + offs_hg).to(tl.int64)
    offs_d1 = tl.arange(0, D1)
    offs_n = tl.arange(0, BLOCK_N)

    q_base = Q + b * s_qb + t * s_ql + heads[:, None] * s_qh
    q1 = tl.load(q_base + offs_d1[None, :] * s_qd, mask=h_mask[:, None], other=0.0)
    if UPCAST:
        q1 = q1.to(tl.float32)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2P)
        q2 = tl.load(q_base + offs_d2[None, :] * s_qd, mask=h_mask[:, None] & (offs_d2[None, :] < D1 + D2), other=0.0)
        if UPCAST:
            q2 = q2.to(tl.float32)
    offs_dv = tl.arange(0, DVP)

    k_base = K + b * s_kb + g * s_kh
    v_base = V + b * s_vb + g * s_vh
    i_base = IDX + b * s_ib + t * s_il + g * s_ih

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DVP], tl.float32)
    for start in range(0, TOPK, BLOCK_N):
        slot = start + offs_n
        idx = tl.load(i_base + slot * s_ik, mask=slot < TOPK, other=-1)
        valid = idx >= 0
        rows = tl.where(valid, idx, 0).to(tl.int64)
        k1 = tl.load(k_base + rows[:, None] * s_kl + offs_d1[None, :] * s_kd, mask=valid[:, None], other=0.0)
        if UPCAST:
            k1 = k1.to(tl.float32)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
        if D2 > 0:
            k2 = tl.load(
                k_base + rows[:, None] * s_kl + offs_d2[None, :] * s_kd,
                mask=valid[:, None] & (offs_d2[None, :] < D1 + D2),
                other=0.0,
            )
            if UPCAST:
                k2 = k2.to(tl.float32)
            s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
        s = tl.where(valid[None, :], s * qk_scale_log2, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no valid key yet keeps m = -inf; subtract 0 instead so no -inf - -inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_IS_K:
            v = k1
        else:
            v = tl.load(
                v_base + rows[:, None] * s_vl + offs_dv[None, :] * s_vd,
                mask=valid[:, None] & (offs_dv[None, :] < DV),
                other=0.0,
            )
            if UPCAST:
                v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, (m_i + tl.log2(tl.where(has_any, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptr = OUT + b * s_ob + t * s_ol + heads[:, None] * s_oh + offs_dv[None, :] * s_od
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=h_mask[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b * s_lb + t * s_ll + heads * s_lh, lse, mask=h_mask)


# ----------------------------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape of one kernel launch."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    """Backward = dq pass (heads on M, like the forward) + dk/dv pass (keys on M, loop over heads)."""

    dq: KernelConfig
    dkv: KernelConfig


def _split_dim(d: int) -> tuple[int, int, int]:
    """``d = D1 + D2`` with D1 the largest power of two ≤ d; D2 padded to a power of two ≥ 16 (D2P, tl.dot's K)."""
    d1 = 1 << (d.bit_length() - 1)
    d2 = d - d1
    return d1, d2, (max(16, triton.next_power_of_2(d2)) if d2 else 0)


def _block_h(group: int, cap: int = 64) -> int:
    """Heads of one KV group per program: the whole group up to ``cap``, at least 16 rows for tl.dot."""
    return min(cap, max(16, triton.next_power_of_2(group)))


def default_fwd_config(group: int, d_qk: int, d_v: int, on_gpu: bool = True) -> KernelConfig:
    """Forward tiles per shape; measured on H100 (benchmarks/NOTES_sparse_attention.md). ``on_gpu=False``: small
    tiles for Triton's CPU interpreter."""
    if not on_gpu:
        return KernelConfig(_block_h(group), 32, 4, 1)
    if d_qk > 256 or d_v > 256:  # MLA 576/512: 8 warps hold the [64, 512] fp32 accumulator without spills
        return KernelConfig(_block_h(group), 64, 8, 2)
    return KernelConfig(_block_h(group), 64, 4, 2)


def default_bwd_config(group: int, d_qk: int, d_v: int, on_gpu: bool = True) -> BwdConfig:
    """Backward tiles per shape. The dk/dv pass takes all heads of the group at once (up to 128) so each key
    row gets one atomic per token; its operands stream in 128-wide d-chunks, so registers stay low."""
    if not on_gpu:
        return BwdConfig(KernelConfig(_block_h(group), 32, 4, 1), KernelConfig(_block_h(group, 128), 32, 4, 1))
    if d_qk > 256 or d_v > 256:  # measured at 8K: dq 32.5 ms (BLOCK_N 32: 41.0), dkv 30.0 ms (BLOCK_N 64: 42.7)
        return BwdConfig(KernelConfig(_block_h(group), 64, 8, 1), KernelConfig(_block_h(group, 128), 128, 8, 2))
    return BwdConfig(KernelConfig(_block_h(group), 64, 4, 2), KernelConfig(_block_h(group, 128), 64, 4, 2))


def _v_is_k(k: torch.Tensor, v: torch.Tensor, d1: int) -> bool:
    """True when v is k[..., :d1] (MLA absorbed mode): same storage, same start, same row strides."""
    return (
        v.shape[-1] == d1
        and v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        and v.data_ptr() == k.data_ptr()
        and v.stride() == k.stride()
    )


def check_sparse_inputs(q: object, k: object, v: object, topk_indices: object,
                        dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES, *, indices_checked: bool = False) -> None:
    """q [B, Lq, H, d_qk], k [B, Lk, Hkv, d_qk], v [B, Lk, Hkv, d_v] (H a multiple of Hkv, float ``dtypes``) and
    topk_indices [B, Lq, k] or [B, Lq, Hkv, k] holding rows in [0, Lk) or −1, all on one device.

    The index range is checked on the device (no host sync on CUDA) unless ``indices_checked`` says the caller
    guarantees it (see :func:`sparse_attention`)."""
    check_tensor("q", q, ndim=4, dtypes=dtypes)
    check_tensor("k", k, ndim=4, dtypes=dtypes)
    check_tensor("v", v, ndim=4, dtypes=dtypes)
    check_tensor("topk_indices", topk_indices, dtypes=(torch.int32, torch.int64))
    check_same_batch("q", q, k=k, v=v, topk_indices=topk_indices)
    check_dim("k", k, 3, q.shape[3], "d_qk, as in q")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, Lk, Hkv, d_v] with B, Lk, Hkv as k {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]}) for GQA/MQA")
    if topk_indices.dim() not in (3, 4) or topk_indices.shape[1] != q.shape[1]:
        raise ValueError(f"topk_indices must be [B, Lq, k] (shared by all heads) or [B, Lq, Hkv, k] with "
                         f"Lq={q.shape[1]}, got {tuple(topk_indices.shape)}")
    if topk_indices.dim() == 4:
        check_dim("topk_indices", topk_indices, 2, k.shape[2], "KV groups")
    check_same_device(q=q, k=k, v=v, topk_indices=topk_indices)
    if not indices_checked:
        check_index_range("topk_indices", topk_indices, k.shape[1])


def _prepare(q, k, v, topk_indices, softmax_scale, indices_checked):
    check_sparse_inputs(q, k, v, topk_indices, indices_checked=indices_checked)
    check_launchable(_sparse_attn_fwd_kernel, q)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    d_qk = q.shape[-1]
    if d_qk < 16 or v.shape[-1] < 16:
        raise ValueError(f"d_qk and d_v must be >= 16 for tl.dot, got {d_qk} and {v.shape[-1]}")
    idx = topk_indices if topk_indices.dtype == torch.int32 else topk_indices.to(torch.int32)
    scale = d_qk**-0.5 if softmax_scale is None else float(softmax_scale)
    return idx, scale


def _idx_strides(idx: torch.Tensor) -> tuple[int, int, int, int]:
    if idx.dim() == 3:  # shared by all KV groups
        return idx.stride(0), idx.stride(1), 0, idx.stride(2)
    return idx.stride(0), idx.stride(1), idx.stride(2), idx.stride(3)


def _upcast(x: torch.Tensor) -> bool:
    # bf16 × bf16 tl.dot is wrong in the CPU interpreter; fp32/fp16 are fine there.
    return (not x.is_cuda) and x.dtype == torch.bfloat16


def _dot_precision(x: torch.Tensor) -> str:
    """``input_precision`` of every dot. fp32 operands on the GPU get 3xTF32: Triton's default TF32 rounds them
    to 10 mantissa bits, ~1e-3 relative — far more than plain torch's fp32 matmul (the accuracy rule), and
    enough to move an fp32 model's decode logits by 1e-2 against its own fused-dense forward. bf16/fp16
    operands ignore it (tensor-core MMA in their own type); the interpreter computes exactly ("ieee")."""
    if not x.is_cuda:
        return "ieee"
    return "tf32x3" if x.dtype == torch.float32 else "tf32"


def sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on checked inputs (idx int32). Returns (out, lse), written into the given
    contiguous buffers when passed (tests poison them to prove every element is written)."""
    b, lq, h, d_qk = q.shape
    hkv, d_v = k.shape[2], v.shape[3]
    group = h // hkv
    d1, d2, d2p = _split_dim(d_qk)
    cfg = config or default_fwd_config(group, d_qk, d_v, q.is_cuda)
    v_is_k = _v_is_k(k, v, d1)
    out = torch.empty((b, lq, h, d_v), device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty((b, lq, h), device=q.device, dtype=torch.float32) if lse is None else lse
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    head_blocks = triton.cdiv(group, cfg.block_h)
    grid = (b * lq * hkv * head_blocks,)
    _sparse_attn_fwd_kernel[grid](
        q, k, v, idx, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_idx_strides(idx), *out.stride(), *lse.stride(),
        lq, idx.shape[-1], group, head_blocks, hkv * head_blocks, scale * _LOG2E,
        BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, D1=d1, D2=d2, D2P=d2p,
        DV=d_v, DVP=triton.next_power_of_2(d_v), V_IS_K=v_is_k, UPCAST=_upcast(q), PREC=_dot_precision(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def sparse_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    scale: float,
    needs: tuple[bool, bool, bool] = (True, True, True),
    config: BwdConfig | None = None,
    dq: torch.Tensor | None = None,
    p_attn: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels (delta, dq, dk/dv). Returns (dq, dk, dv); dv is None when it was folded into
    dk (v is a view of k and both need grads). ``dq`` may be a preallocated (e.g. poisoned) buffer.

    ``p_attn`` [B, Lq, k] float32 (contiguous; ``idx`` then [B, Lq, k]): the dq pass also writes the head-mean
    attention probabilities on every slot into it — 0 on −1 slots and rows without keys (the fused indexer KL's
    target). The dq pass then runs even when q needs no gradient."""
    b, lq, h, d_qk = q.shape
    lk, hkv, d_v = k.shape[1], k.shape[2], v.shape[3]
    group = h // hkv
    d1, d2, d2p = _split_dim(d_qk)
    dvp = max(16, triton.next_power_of_2(d_v))
    cfg = config or default_bwd_config(group, d_qk, d_v, q.is_cuda)
    need_q, need_k, need_v = needs
    write_p = p_attn is not None
    if write_p and (idx.dim() != 3 or p_attn.shape != idx.shape or p_attn.dtype != torch.float32):
        raise ValueError(f"p_attn must be float32 [B, Lq, k] = {tuple(idx.shape)} with [B, Lq, k] indices, got "
                         f"{tuple(p_attn.shape)} {p_attn.dtype} for indices {tuple(idx.shape)}")
    v_is_k = _v_is_k(k, v, d1)
    # Fold dV into dK only when both are wanted: the latent then receives their sum through autograd.
    fold = v_is_k and need_k and need_v
    if (need_q or write_p) and dq is None:
        dq = torch.empty_like(q)  # without need_q: scratch for the p_attn pass
    dk32 = torch.zeros((b, lk, hkv, d_qk), device=q.device, dtype=torch.float32) if need_k else None
    dv32 = torch.zeros((b, lk, hkv, d_v), device=q.device, dtype=torch.float32) if need_v and not fold else None
    topk = idx.shape[-1]
    if q.numel() == 0 or topk == 0 or lk == 0:
        if dq is not None:
            dq.zero_()
        if write_p:
            p_attn.zero_()
    else:
        do = grad_out
        delta = torch.empty_like(lse)
        dh = min(64, triton.next_power_of_2(h))
        _sparse_attn_bwd_delta_kernel[(b * lq, triton.cdiv(h, dh))](
            out, do, delta, *out.stride(), *do.stride(), *delta.stride(), lq, h,
            BLOCK_H=dh, DV=d_v, DVP=dvp, num_warps=4,
        )  # fmt: skip
        common = dict(D1=d1, D2=d2, D2P=d2p, DV=d_v, DVP=dvp, V_IS_K=v_is_k, UPCAST=_upcast(q),
                      PREC=_dot_precision(q))
        run_dq, run_kv = need_q or write_p, need_k or need_v
        if run_dq:
            head_blocks = triton.cdiv(group, cfg.dq.block_h)
            num_hb = hkv * head_blocks
            # p_attn: written in place (one program per slot), added by ≤ 2 programs (deterministic), or one
            # plane per head block summed afterwards (deterministic; 4·NUM_HB·B·Lq·k bytes of scratch).
            p_atomic = write_p and num_hb == 2
            planes = p_attn[None] if write_p and num_hb <= 2 else (
                torch.empty((num_hb, *p_attn.shape), device=q.device, dtype=torch.float32) if write_p else lse)
            if p_atomic:
                p_attn.zero_()
            p_strides = planes.stride() if write_p else (0, 0, 0, 0)
        if run_kv:
            dummy = lse.new_empty((1, 1, 1, 1))  # stands in for a buffer this launch does not write
            dk_t = dk32 if dk32 is not None else dummy
            dv_t = dv32 if dv32 is not None else dummy
            key_blocks = triton.cdiv(topk, cfg.dkv.block_n)
            kv_head_blocks = triton.cdiv(group, cfg.dkv.block_h)
        shared = (*q.stride(), *k.stride(), *v.stride(), *_idx_strides(idx), *do.stride(), *lse.stride())
        if run_dq and run_kv and MIXED_BACKWARD and cfg.dq.num_warps == cfg.dkv.num_warps:
            n_dq = b * lq * num_hb
            n_kv = b * lq * hkv * kv_head_blocks * key_blocks
            _sparse_attn_bwd_mixed_kernel[(n_dq + n_kv,)](
                q, k, v, idx, do, lse, delta, dq, planes, dk_t, dv_t,
                *shared, *dq.stride(), *p_strides, *dk_t.stride(), *dv_t.stride(),
                lq, topk, group, hkv, head_blocks, num_hb, kv_head_blocks, key_blocks, scale, scale * _LOG2E,
                1.0 / h, n_dq, n_kv // n_dq,
                DQ_BLOCK_H=cfg.dq.block_h, DQ_BLOCK_N=cfg.dq.block_n, DQ_STAGES=cfg.dq.num_stages,
                KV_BLOCK_H=cfg.dkv.block_h, KV_BLOCK_N=cfg.dkv.block_n, KV_STAGES=cfg.dkv.num_stages,
                **common, WRITE_P=write_p, P_ATOMIC=p_atomic, COMPUTE_DK=need_k, COMPUTE_DV=need_v, FOLD_DV=fold,
                num_warps=cfg.dq.num_warps, num_stages=max(cfg.dq.num_stages, cfg.dkv.num_stages),
            )  # fmt: skip
            run_dq = run_kv = False
        if run_dq:
            _sparse_attn_bwd_dq_kernel[(b * lq * num_hb,)](
                q, k, v, idx, do, lse, delta, dq, planes, *shared, *dq.stride(), *p_strides,
                lq, topk, group, head_blocks, num_hb, scale, scale * _LOG2E, 1.0 / h,
                BLOCK_H=cfg.dq.block_h, BLOCK_N=cfg.dq.block_n, **common, WRITE_P=write_p, P_ATOMIC=p_atomic,
                STAGES=cfg.dq.num_stages, num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages,
            )  # fmt: skip
        if run_kv:
            _sparse_attn_bwd_dkv_kernel[(b * lq * hkv * kv_head_blocks * key_blocks,)](
                q, k, v, idx, do, lse, delta, dk_t, dv_t, *shared, *dk_t.stride(), *dv_t.stride(),
                lq, topk, group, hkv, kv_head_blocks, key_blocks, scale, scale * _LOG2E,
                BLOCK_H=cfg.dkv.block_h, BLOCK_N=cfg.dkv.block_n, **common,
                COMPUTE_DK=need_k, COMPUTE_DV=need_v, FOLD_DV=fold,
                STAGES=cfg.dkv.num_stages, num_warps=cfg.dkv.num_warps, num_stages=cfg.dkv.num_stages,
            )  # fmt: skip
        if write_p and num_hb > 2:
            torch.sum(planes, 0, out=p_attn)
    dk = dk32.to(k.dtype) if dk32 is not None else None
    dv = dv32.to(v.dtype) if dv32 is not None else None
    return dq, dk, dv


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, scale):
        out, lse = sparse_attention_fwd(q, k, v, idx, scale)
        ctx.save_for_backward(q, k, v, idx, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, idx, out, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs):
            return None, None, None, None, None
        # grad_lse is ignored: lse is marked non-differentiable (callers such as the KL loss detach it).
        dq, dk, dv = sparse_attention_bwd(q, k, v, idx, out, lse, grad_out, ctx.scale, needs)  # type: ignore[arg-type]
        return dq, dk, dv, None, None


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_indices: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    indices_checked: bool = False,
    **ignored_kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query restricted to its selected keys (Triton; same contract as the reference op).

    Args:
        q: [B, Lq, H, d_qk] fp16/bf16/fp32.
        k: [B, Lk, Hkv, d_qk], q's dtype; H must be a multiple of Hkv (Hkv = 1: MQA/MLA, else GQA).
        v: [B, Lk, Hkv, d_v]; may be a view ``k[..., :d_v]`` of the same latent (MLA absorbed, no copy made).
        topk_indices: [B, Lq, k] shared by all heads, or [B, Lq, Hkv, k] per KV group; int32 (int64 is
            converted) rows of k/v, −1 for an empty slot.
        softmax_scale: default ``d_qk ** -0.5``.
        indices_checked: the caller guarantees every index is in [−1, Lk) — set only by internal callers whose
            indices are in range by construction (our own top-k, or replayed indices validated as causal);
            skips the device-side range check (a min/max reduction and an assertion). Default False: checked
            without a host sync (CUDA: device-side assertion; CPU: ``ValueError``).
        ignored_kwargs: reference-only options (``chunk_size``), accepted and ignored.

    Returns:
        ``(out [B, Lq, H, d_v] in q's dtype, lse [B, Lq, H] float32)``: natural-log sum-exp of the scaled
        logits over the selected keys; a row with no valid key has lse −inf and output 0.
        Differentiable in q, k, v (lse is not). When v is a view of k, v's gradient is folded into k's.
    """
    idx, scale = _prepare(q, k, v, topk_indices, softmax_scale, indices_checked)
    return _SparseAttention.apply(q, k, v, idx, scale)


def sparse_attention_flops(tokens: int, heads: int, topk: int, d_qk: int, d_v: int, backward: bool = False) -> float:
    """Useful FLOPs: 2·H·k·(d_qk + d_v) per query forward, 2.5× that backward (docs/design.md, "Cost")."""
    fwd = 2.0 * tokens * heads * topk * (d_qk + d_v)
    return 2.5 * fwd if backward else fwd


__all__ = ["BwdConfig", "KernelConfig", "check_sparse_inputs", "sparse_attention", "sparse_attention_bwd",
           "sparse_attention_fwd"]
