"""The three backward kernels of :mod:`kernels.sparse_attention` (docs/design.md, "Sparse attention").

* ``_sparse_attn_bwd_delta_kernel`` — delta = rowsum(dO ⊙ O) in fp32, once for both passes;
* ``_sparse_attn_bwd_dq_kernel`` — shaped like the forward (one program per token, KV group and head block; the
  group's heads on the MMA M dimension): recomputes S and dP, dq accumulates in registers; with ``WRITE_P`` it
  also stores the head-mean of the recomputed P tiles, the sparse indexer KL's target;
* ``_sparse_attn_bwd_dkv_kernel`` — the selected keys on M and all heads of the group on N, operands streamed in
  128-wide d-chunks, each chunk of dK/dV added with fp32 atomics.

The launch wrapper (:func:`kernels.sparse_attention.sparse_attention_bwd`), the tile configs and the measured
costs live with the forward in :mod:`kernels.sparse_attention`; this file holds only the ``@triton.jit`` code.
"""

import triton
import triton.language as tl


@triton.jit
def _sparse_attn_bwd_delta_kernel(
    OUT, DO, DELTA,
    s_ob, s_ol, s_oh, s_od,
    s_db, s_dl, s_dh, s_dd,
    s_eb, s_el, s_eh,
    LQ, H,
    BLOCK_H: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
):  # fmt: skip
    """delta[b, t, h] = Σ_d dO ⊙ O (fp32): the softmax-backward row term, computed once for both passes."""
    pid_t = tl.program_id(0).to(tl.int64)
    b = pid_t // LQ
    t = pid_t % LQ
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_dv = tl.arange(0, DVP)
    mask = (heads < H)[:, None] & (offs_dv < DV)[None, :]
    heads = heads.to(tl.int64)
    o = tl.load(OUT + b * s_ob + t * s_ol + heads[:, None] * s_oh + offs_dv[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + b * s_db + t * s_dl + heads[:, None] * s_dh + offs_dv[None, :] * s_dd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * s_eb + t * s_el + heads * s_eh, delta, mask=heads < H)


@triton.jit
def _dq_program(
    pid,
    Q, K, V, IDX, DO, LSE, DELTA, DQ, PATTN,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_ib, s_il, s_ih, s_ik,
    s_db, s_dl, s_dh, s_dd,
    s_lb, s_ll, s_lh,
    s_gb, s_gl, s_gh, s_gd,
    s_pp, s_pb, s_pl, s_pk,
    LQ, TOPK, GROUP, HEAD_BLOCKS, NUM_HB, sm_scale, qk_scale_log2, inv_heads,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    V_IS_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, WRITE_P: tl.constexpr, P_ATOMIC: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """dq = scale · Σ_s dS[:, s] K[s] with dS = P ⊙ (dO·Vᵀ − delta); one program per (token, head block),
    like the forward (heads on M), so dq needs no atomics.

    WRITE_P (the fused indexer KL): also write this program's share of the head-mean probabilities,
    PATTN[plane, b, t, slot] = (1/H) Σ_{its heads} P — the sparse KL's target, from the P tile recomputed here
    anyway with the final lse (a column sum per key block). Plane = this program's head block, or with P_ATOMIC
    one zeroed plane that at most two programs add into (0 + a + b = 0 + b + a exactly: still deterministic)."""
    tl.static_assert(BLOCK_H >= 16)
    pid_t = pid // NUM_HB
    pid_h = pid % NUM_HB
    b = pid_t // LQ
    t = pid_t % LQ
    g = pid_h // HEAD_BLOCKS
    hb = pid_h % HEAD_BLOCKS
    offs_hg = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_hg < GROUP
    heads = (g * GROUP + offs_hg).to(tl.int64)
    offs_d1 = tl.arange(0, D1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, DVP)
    dv_mask = offs_dv < DV

    q_base = Q + b * s_qb + t * s_ql + heads[:, None] * s_qh
    q1 = tl.load(q_base + offs_d1[None, :] * s_qd, mask=h_mask[:, None], other=0.0)
    if UPCAST:
        q1 = q1.to(tl.float32)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2P)
        d2_mask = offs_d2 < D1 + D2
        q2 = tl.load(q_base + offs_d2[None, :] * s_qd, mask=h_mask[:, None] & d2_mask[None, :], other=0.0)
        if UPCAST:
            q2 = q2.to(tl.float32)
    hd_mask = h_mask[:, None] & dv_mask[None, :]
    do = tl.load(DO + b * s_db + t * s_dl + heads[:, None] * s_dh + offs_dv[None, :] * s_dd, mask=hd_mask, other=0.0)
    if UPCAST:
        do = do.to(tl.float32)
    row = b * s_lb + t * s_ll + heads * s_lh  # LSE and DELTA share the [B, Lq, H] fp32 layout
    lse = tl.load(LSE + row, mask=h_mask, other=float("-inf"))
    delta = tl.load(DELTA + row, mask=h_mask, other=0.0)
    # Padded heads and empty rows (lse = -inf) get +inf so that P = exp2(s - inf) = 0 everywhere.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

    k_base = K + b * s_kb + g * s_kh
    v_base = V + b * s_vb + g * s_vh
    i_base = IDX + b * s_ib + t * s_il + g * s_ih
    dq1 = tl.zeros([BLOCK_H, D1], tl.float32)
    if D2 > 0:
        dq2 = tl.zeros([BLOCK_H, D2P], tl.float32)
    for start in tl.range(0, TOPK, BLOCK_N, num_stages=STAGES):
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
                mask=valid[:, None] & d2_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                k2 = k2.to(tl.float32)
            s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
        p = tl.exp2(s * qk_scale_log2 - lse2[:, None])
        p = tl.where(valid[None, :], p, 0.0)
        if WRITE_P:
            p_head_mean = tl.sum(p, 0) * inv_heads  # [BLOCK_N]; padded heads and empty rows have P = 0
            p_ptr = PATTN + b * s_pb + t * s_pl + slot * s_pk
            if P_ATOMIC:
                tl.atomic_add(p_ptr, p_head_mean, mask=slot < TOPK, sem="relaxed")
            else:
                tl.store(p_ptr + pid_h * s_pp, p_head_mean, mask=slot < TOPK)
        if V_IS_K:
            v = k1
        else:
            v = tl.load(
                v_base + rows[:, None] * s_vl + offs_dv[None, :] * s_vd,
                mask=valid[:, None] & dv_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                v = v.to(tl.float32)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = (p * (dp - delta[:, None]) * sm_scale).to(k1.dtype)  # d loss / d (q·k), scale folded in
        dq1 += tl.dot(ds, k1, input_precision=PREC)
        if D2 > 0:
            dq2 += tl.dot(ds, k2, input_precision=PREC)

    dq_base = DQ + b * s_gb + t * s_gl + heads[:, None] * s_gh
    tl.store(dq_base + offs_d1[None, :] * s_gd, dq1.to(DQ.dtype.element_ty), mask=h_mask[:, None])
    if D2 > 0:
        tl.store(
            dq_base + offs_d2[None, :] * s_gd, dq2.to(DQ.dtype.element_ty), mask=h_mask[:, None] & d2_mask[None, :]
        )


@triton.jit
def _dkv_program(
    pid,
    Q, K, V, IDX, DO, LSE, DELTA, DK, DV_BUF,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_ib, s_il, s_ih, s_ik,
    s_db, s_dl, s_dh, s_dd,
    s_lb, s_ll, s_lh,
    s_kgb, s_kgl, s_kgh, s_kgd,
    s_vgb, s_vgl, s_vgh, s_vgd,
    LQ, TOPK, GROUP, HKV, HEAD_BLOCKS, KEY_BLOCKS, sm_scale, qk_scale_log2,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    V_IS_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, FOLD_DV: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """dk[s] += scale · dSᵀ q, dv[s] += Pᵀ dO for one (token, KV group, head block, block of selected keys).

    Keys sit on M and heads on N (Sᵀ = K·qᵀ), and every operand is streamed in chunks of ≤128 along d, so no
    [BLOCK_N, d] accumulator is held: with 576/512 a whole-row fp32 accumulator (and the K tile held for the
    head loop) spilled ~1700 registers. Each chunk of dk/dv goes out with fp32 atomics right away; with
    BLOCK_H = all heads of the group, each selected key row gets ONE atomic per element per token.
    With FOLD_DV (v is a view of k) dv is added into DK's first D1 columns (same latent rows).
    """
    tl.static_assert(BLOCK_H >= 16)
    tl.static_assert((not FOLD_DV) or (V_IS_K and COMPUTE_DK and COMPUTE_DV))
    CK: tl.constexpr = 128 if D1 > 128 else D1  # d-chunk of q/k
    CV: tl.constexpr = 128 if DVP > 128 else DVP  # d-chunk of v/dO
    kb = pid % KEY_BLOCKS  # programs of one token are adjacent: its q / dO stay hot in L2
    rest = pid // KEY_BLOCKS
    hb = rest % HEAD_BLOCKS
    rest = rest // HEAD_BLOCKS
    g = rest % HKV
    pid_t = rest // HKV
    b = pid_t // LQ
    t = pid_t % LQ
    slot = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    idx = tl.load(IDX + b * s_ib + t * s_il + g * s_ih + slot * s_ik, mask=slot < TOPK, other=-1)
    valid = idx >= 0
    rows = tl.where(valid, idx, 0).to(tl.int64)
    offs_hg = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_hg < GROUP
    heads = (g * GROUP + offs_hg).to(tl.int64)
    offs_ck = tl.arange(0, CK)
    offs_cv = tl.arange(0, CV)
    k_rows = K + b * s_kb + g * s_kh + rows[:, None] * s_kl
    v_rows = V + b * s_vb + g * s_vh + rows[:, None] * s_vl
    q_rows = Q + b * s_qb + t * s_ql + heads[:, None] * s_qh
    do_rows = DO + b * s_db + t * s_dl + heads[:, None] * s_dh

    # Pass 1: Sᵀ = K qᵀ and (dO Vᵀ)ᵀ = V dOᵀ, both [BLOCK_N, BLOCK_H], streamed over d.
    st = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    dpt = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for c in tl.range(0, D1, CK, num_stages=STAGES):
        kc = tl.load(k_rows + (c + offs_ck)[None, :] * s_kd, mask=valid[:, None], other=0.0)
        qc = tl.load(q_rows + (c + offs_ck)[None, :] * s_qd, mask=h_mask[:, None], other=0.0)
        if UPCAST:
            kc = kc.to(tl.float32)
            qc = qc.to(tl.float32)
        st += tl.dot(kc, tl.trans(qc), input_precision=PREC)
        if V_IS_K and COMPUTE_DK:  # V = K[..., :D1]: reuse the chunk just loaded
            doc = tl.load(do_rows + (c + offs_ck)[None, :] * s_dd, mask=h_mask[:, None], other=0.0)
            if UPCAST:
                doc = doc.to(tl.float32)
            dpt += tl.dot(kc, tl.trans(doc), input_precision=PREC)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2P)
        d2_mask = offs_d2 < D1 + D2
        k2 = tl.load(k_rows + offs_d2[None, :] * s_kd, mask=valid[:, None] & d2_mask[None, :], other=0.0)
        q2 = tl.load(q_rows + offs_d2[None, :] * s_qd, mask=h_mask[:, None] & d2_mask[None, :], other=0.0)
        if UPCAST:
            k2 = k2.to(tl.float32)
            q2 = q2.to(tl.float32)
        st += tl.dot(k2, tl.trans(q2), input_precision=PREC)
    if (not V_IS_K) and COMPUTE_DK:
        for c in tl.range(0, DVP, CV, num_stages=STAGES):
            dmask = (c + offs_cv) < DV
            vc = tl.load(v_rows + (c + offs_cv)[None, :] * s_vd, mask=valid[:, None] & dmask[None, :], other=0.0)
            doc = tl.load(do_rows + (c + offs_cv)[None, :] * s_dd, mask=h_mask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                vc = vc.to(tl.float32)
                doc = doc.to(tl.float32)
            dpt += tl.dot(vc, tl.trans(doc), input_precision=PREC)

    row = b * s_lb + t * s_ll + heads * s_lh
    lse = tl.load(LSE + row, mask=h_mask, other=float("-inf"))
    delta = tl.load(DELTA + row, mask=h_mask, other=0.0)
    # Padded heads and empty rows (lse = -inf) get +inf so that P = exp2(s - inf) = 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    pt = tl.exp2(st * qk_scale_log2 - lse2[None, :])
    pt = tl.where(valid[:, None], pt, 0.0)
    p_op = pt.to(DO.dtype.element_ty) if not UPCAST else pt
    ds_op = (pt * (dpt - delta[None, :]) * sm_scale).to(Q.dtype.element_ty)
    if UPCAST:
        ds_op = ds_op.to(tl.float32)

    # Pass 2: dK = dSᵀ q (+ Pᵀ dO when folded), dV = Pᵀ dO, chunk by chunk straight to the fp32 atomics.
    if COMPUTE_DK:
        dk_rows = DK + b * s_kgb + g * s_kgh + rows[:, None] * s_kgl
        for c in tl.range(0, D1, CK, num_stages=STAGES):
            qc = tl.load(q_rows + (c + offs_ck)[None, :] * s_qd, mask=h_mask[:, None], other=0.0)
            if UPCAST:
                qc = qc.to(tl.float32)
            dkc = tl.dot(ds_op, qc, input_precision=PREC)
            if FOLD_DV:
                doc = tl.load(do_rows + (c + offs_ck)[None, :] * s_dd, mask=h_mask[:, None], other=0.0)
                if UPCAST:
                    doc = doc.to(tl.float32)
                dkc += tl.dot(p_op, doc, input_precision=PREC)
            tl.atomic_add(dk_rows + (c + offs_ck)[None, :] * s_kgd, dkc, mask=valid[:, None], sem="relaxed")
        if D2 > 0:
            dk2 = tl.dot(ds_op, q2, input_precision=PREC)
            dk2_mask = valid[:, None] & d2_mask[None, :]
            tl.atomic_add(dk_rows + offs_d2[None, :] * s_kgd, dk2, mask=dk2_mask, sem="relaxed")
    if COMPUTE_DV and not FOLD_DV:
        dv_rows = DV_BUF + b * s_vgb + g * s_vgh + rows[:, None] * s_vgl
        for c in tl.range(0, DVP, CV, num_stages=STAGES):
            dmask = (c + offs_cv) < DV
            doc = tl.load(do_rows + (c + offs_cv)[None, :] * s_dd, mask=h_mask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                doc = doc.to(tl.float32)
            dvc = tl.dot(p_op, doc, input_precision=PREC)
            tl.atomic_add(dv_rows + (c + offs_cv)[None, :] * s_vgd, dvc, mask=valid[:, None] & dmask[None, :],
                          sem="relaxed")  # fmt: skip


@triton.jit
def _sparse_attn_bwd_dq_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, PATTN,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_ib, s_il, s_ih, s_ik,
    s_db, s_dl, s_dh, s_dd,
    s_lb, s_ll, s_lh,
    s_gb, s_gl, s_gh, s_gd,
    s_pp, s_pb, s_pl, s_pk,
    LQ, TOPK, GROUP, HEAD_BLOCKS, NUM_HB, sm_scale, qk_scale_log2, inv_heads,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    V_IS_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, WRITE_P: tl.constexpr, P_ATOMIC: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """The dq pass: one program per (token, head block) — see :func:`_dq_program`."""
    _dq_program(
        tl.program_id(0).to(tl.int64), Q, K, V, IDX, DO, LSE, DELTA, DQ, PATTN, s_qb, s_ql, s_qh, s_qd, s_kb, s_kl,
        s_kh, s_kd, s_vb, s_vl, s_vh, s_vd, s_ib, s_il, s_ih, s_ik, s_db, s_dl, s_dh, s_dd, s_lb, s_ll, s_lh, s_gb,
        s_gl, s_gh, s_gd, s_pp, s_pb, s_pl, s_pk, LQ, TOPK, GROUP, HEAD_BLOCKS, NUM_HB, sm_scale, qk_scale_log2,
        inv_heads, BLOCK_H, BLOCK_N, D1, D2, D2P, DV, DVP, V_IS_K, UPCAST, PREC, WRITE_P, P_ATOMIC, STAGES
    )


@triton.jit
def _sparse_attn_bwd_dkv_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DK, DV_BUF,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_ib, s_il, s_ih, s_ik,
    s_db, s_dl, s_dh, s_dd,
    s_lb, s_ll, s_lh,
    s_kgb, s_kgl, s_kgh, s_kgd,
    s_vgb, s_vgl, s_vgh, s_vgd,
    LQ, TOPK, GROUP, HKV, HEAD_BLOCKS, KEY_BLOCKS, sm_scale, qk_scale_log2,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    V_IS_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, FOLD_DV: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """The dk/dv pass: one program per (token, KV group, head block, key block) — see :func:`_dkv_program`."""
    _dkv_program(
        tl.program_id(0).to(tl.int64), Q, K, V, IDX, DO, LSE, DELTA, DK, DV_BUF, s_qb, s_ql, s_qh, s_qd, s_kb,
        s_kl, s_kh, s_kd, s_vb, s_vl, s_vh, s_vd, s_ib, s_il, s_ih, s_ik, s_db, s_dl, s_dh, s_dd, s_lb, s_ll, s_lh,
        s_kgb, s_kgl, s_kgh, s_kgd, s_vgb, s_vgl, s_vgh, s_vgd, LQ, TOPK, GROUP, HKV, HEAD_BLOCKS, KEY_BLOCKS,
        sm_scale, qk_scale_log2, BLOCK_H, BLOCK_N, D1, D2, D2P, DV, DVP, V_IS_K, UPCAST, PREC, COMPUTE_DK,
        COMPUTE_DV, FOLD_DV, STAGES
    )


@triton.jit
def _sparse_attn_bwd_mixed_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, PATTN, DK, DV_BUF,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_ib, s_il, s_ih, s_ik,
    s_db, s_dl, s_dh, s_dd,
    s_lb, s_ll, s_lh,
    s_gb, s_gl, s_gh, s_gd,
    s_pp, s_pb, s_pl, s_pk,
    s_kgb, s_kgl, s_kgh, s_kgd,
    s_vgb, s_vgl, s_vgh, s_vgd,
    LQ, TOPK, GROUP, HKV, DQ_HEAD_BLOCKS, NUM_HB, KV_HEAD_BLOCKS, KEY_BLOCKS, sm_scale, qk_scale_log2, inv_heads,
    N_DQ, RATIO,
    DQ_BLOCK_H: tl.constexpr, DQ_BLOCK_N: tl.constexpr, DQ_STAGES: tl.constexpr,
    KV_BLOCK_H: tl.constexpr, KV_BLOCK_N: tl.constexpr, KV_STAGES: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    V_IS_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, WRITE_P: tl.constexpr, P_ATOMIC: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, FOLD_DV: tl.constexpr,
):  # fmt: skip
    """Both passes in one launch, their programs interleaved: every ``RATIO + 1`` consecutive programs are one
    dq program and the ``RATIO`` dk/dv programs of the same token (the dk/dv programs left over run last).

    Why: the dk/dv pass is bound by the L2's fp32 atomic rate (benchmarks/NOTES_sparse_attention.md §7) and the
    dq pass by its MMAs and gathers; run one after the other the GPU waits on one unit at a time. Interleaved,
    some SMs add atomics while others multiply. The programs are the same code as the two separate kernels."""
    pid = tl.program_id(0).to(tl.int64)
    period = RATIO + 1
    if pid < N_DQ * period:
        grp = pid // period
        r = pid % period
        if r == 0:
            _dq_program(
                grp, Q, K, V, IDX, DO, LSE, DELTA, DQ, PATTN, s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd,
                s_vb, s_vl, s_vh, s_vd, s_ib, s_il, s_ih, s_ik, s_db, s_dl, s_dh, s_dd, s_lb, s_ll, s_lh,
                s_gb, s_gl, s_gh, s_gd, s_pp, s_pb, s_pl, s_pk, LQ, TOPK, GROUP, DQ_HEAD_BLOCKS, NUM_HB,
                sm_scale, qk_scale_log2, inv_heads, DQ_BLOCK_H, DQ_BLOCK_N, D1, D2, D2P, DV, DVP, V_IS_K,
                UPCAST, PREC, WRITE_P, P_ATOMIC, DQ_STAGES,
            )
        else:
            kv_pid = grp * RATIO + r - 1
            _dkv_program(
                kv_pid, Q, K, V, IDX, DO, LSE, DELTA, DK, DV_BUF, s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd,
                s_vb, s_vl, s_vh, s_vd, s_ib, s_il, s_ih, s_ik, s_db, s_dl, s_dh, s_dd, s_lb, s_ll, s_lh,
                s_kgb, s_kgl, s_kgh, s_kgd, s_vgb, s_vgl, s_vgh, s_vgd, LQ, TOPK, GROUP, HKV, KV_HEAD_BLOCKS,
                KEY_BLOCKS, sm_scale, qk_scale_log2, KV_BLOCK_H, KV_BLOCK_N, D1, D2, D2P, DV, DVP, V_IS_K,
                UPCAST, PREC, COMPUTE_DK, COMPUTE_DV, FOLD_DV, KV_STAGES,
            )
    else:
        kv_pid = N_DQ * RATIO + (pid - N_DQ * period)
        _dkv_program(
            kv_pid, Q, K, V, IDX, DO, LSE, DELTA, DK, DV_BUF, s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd,
            s_vb, s_vl, s_vh, s_vd, s_ib, s_il, s_ih, s_ik, s_db, s_dl, s_dh, s_dd, s_lb, s_ll, s_lh,
            s_kgb, s_kgl, s_kgh, s_kgd, s_vgb, s_vgl, s_vgh, s_vgd, LQ, TOPK, GROUP, HKV, KV_HEAD_BLOCKS,
            KEY_BLOCKS, sm_scale, qk_scale_log2, KV_BLOCK_H, KV_BLOCK_N, D1, D2, D2P, DV, DVP, V_IS_K,
            UPCAST, PREC, COMPUTE_DK, COMPUTE_DV, FOLD_DV, KV_STAGES,
        )
