"""Tiles shared by the indexer KL kernels (kernels/indexer_kl.py, kernels/indexer_kl_backward.py).

Per query row ``t`` (one program each) and a block of ``BLOCK_N`` keys: the key rows and their validity
(:func:`_key_block`), the KL target p on them (:func:`_target_tile`, rebuilt from q, k and the attention's lse)
and the indexer pre-activations and logits, with the indexer heads on the MMA M dimension
(:func:`_index_tile`, forward and legacy backward) or the keys on M (:func:`_index_tile_keys_m`, the v2
backward, whose dk_I tile then has the contiguous d_I axis on N). docs/design.md, "Indexer losses".
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _target_tile(
    q_ptr, k_ptr, lse_ptr, b, t, kid, valid, scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_lb, stride_lt,
    H: tl.constexpr, HG: tl.constexpr, HGP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """p[s] = (1/H) Σ_h exp(scale·q_h·k_g(h)[s] − lse_h) for the BLOCK_N keys ``kid`` (0 where not ``valid``)."""
    hh = tl.arange(0, HGP)
    dc = tl.arange(0, DC)
    psum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in tl.static_range(HKV):
        acc = tl.zeros([HGP, BLOCK_N], dtype=tl.float32)  # group g's heads on M, keys on N
        for d0 in tl.static_range(0, D, DC):
            dm = (d0 + dc) < D
            q_off = b * stride_qb + t * stride_qt + (g * HG + hh)[:, None] * stride_qh + (d0 + dc)[None, :]
            qc = tl.load(q_ptr + q_off, mask=(hh < HG)[:, None] & dm[None, :], other=0.0)
            kc = tl.load(k_ptr + b * stride_kb + kid[:, None] * stride_kt + g * stride_kh + (d0 + dc)[None, :],
                         mask=valid[:, None] & dm[None, :], other=0.0)
            if UPCAST:
                qc = qc.to(tl.float32)
                kc = kc.to(tl.float32)
            if IEEE:
                acc += tl.dot(qc, tl.trans(kc), input_precision="ieee")
            else:
                acc += tl.dot(qc, tl.trans(kc))
        lse = tl.load(lse_ptr + b * stride_lb + t * stride_lt + g * HG + hh, mask=hh < HG, other=0.0)
        lse = tl.where((lse > float("-inf")) & (lse < float("inf")), lse, 0.0)  # as the reference: no inf − inf
        e = tl.exp(acc * scale - lse[:, None])
        psum += tl.sum(tl.where((hh < HG)[:, None] & valid[None, :], e, 0.0), axis=0)
    return psum / H


@triton.jit
def _index_tile(
    qi, w, ki_ptr, ks_ptr, b, kid, valid,
    stride_kib, stride_kit, stride_ksb,
    DI: tl.constexpr, DIP: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KSCALE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Indexer pre-activations a [HIP, BLOCK_N], logits I [BLOCK_N] (−inf where not valid), keys, key scales."""
    dd = tl.arange(0, DIP)
    kt = tl.load(ki_ptr + b * stride_kib + kid[:, None] * stride_kit + dd[None, :],
                 mask=valid[:, None] & (dd < DI)[None, :], other=0.0)  # [BLOCK_N, DIP]
    if UPCAST:
        kt = kt.to(tl.float32)
    if IEEE:
        a = tl.dot(qi, tl.trans(kt), input_precision="ieee")
    else:
        a = tl.dot(qi, tl.trans(kt))  # [HIP, BLOCK_N]
    logits = tl.sum(tl.maximum(a, 0.0) * w[:, None], axis=0)
    if HAS_KSCALE:
        ksv = tl.load(ks_ptr + b * stride_ksb + kid, mask=valid, other=0.0)
        logits = logits * ksv
    else:
        ksv = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    return a, tl.where(valid, logits, float("-inf")), kt, ksv


@triton.jit
def _key_block(idx_ptr, kpos_ptr, b, t, n0, n_k, n_slots, qpos, stride_ib, stride_it,
               BLOCK_N: tl.constexpr, SPARSE: tl.constexpr):
    """Key rows of block n0 and their validity: gathered top-k slots (sparse) or contiguous causal keys."""
    sl = n0 + tl.arange(0, BLOCK_N)
    if SPARSE:
        kid = tl.load(idx_ptr + b * stride_ib + t * stride_it + sl, mask=sl < n_slots, other=-1).to(tl.int64)
        valid = kid >= 0
    else:
        inb = sl < n_k
        kp = tl.load(kpos_ptr + sl, mask=inb, other=0)
        valid = inb & (kp <= qpos)
        kid = sl.to(tl.int64)
    return sl, tl.where(valid, kid, 0), valid



@triton.jit
def _operand(x, GRAD: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` as an MMA operand of the v2 backward: bf16 (bf16 or e4m3/e5m2 inputs, exact for fp8), fp16 or fp32.
    ``UPCAST`` (the CPU interpreter, whose bf16 dot is wrong): the bf16-rounded values, held in fp32."""
    if GRAD == "bf16":
        y = x.to(tl.bfloat16)
    elif GRAD == "fp16":
        y = x.to(tl.float16)
    else:
        y = x.to(tl.float32)
    if UPCAST:
        y = y.to(tl.float32)
    return y


@triton.jit
def _index_tile_keys_m(
    qi, w, ki_ptr, ks_ptr, b, kid, valid,
    stride_kib, stride_kit, stride_ksb,
    DI: tl.constexpr, DIP: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KSCALE: tl.constexpr, GRAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """As :func:`_index_tile` with the keys on M: pre-activations s [BLOCK_N, HIP] (= aᵀ), logits [BLOCK_N] (−inf
    where not valid), the key rows as an operand (:func:`_operand`), the key scales. ``qi`` is an operand too."""
    dd = tl.arange(0, DIP)
    kt = tl.load(ki_ptr + b * stride_kib + kid[:, None] * stride_kit + dd[None, :],
                 mask=valid[:, None] & (dd < DI)[None, :], other=0.0)  # [BLOCK_N, DIP]
    kt = _operand(kt, GRAD, UPCAST)
    s = tl.dot(kt, tl.trans(qi), input_precision=PREC)  # [BLOCK_N, HIP]
    logits = tl.sum(tl.maximum(s, 0.0) * w[None, :], axis=1)
    if HAS_KSCALE:
        ksv = tl.load(ks_ptr + b * stride_ksb + kid, mask=valid, other=0.0)
        logits = logits * ksv
    else:
        ksv = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    return s, tl.where(valid, logits, float("-inf")), kt, ksv
