"""Sparse attention over per-query top-k key sets (docs/design.md, "Sparse attention"), reference implementation.

    u_t = softmax_{s ∈ S_t}(scale · q_t·K[s]) V[s]

One index set per query is shared by all heads of a KV group: MLA in absorbed/MQA mode is ``Hkv = 1`` with
``d_qk = 576`` (latent 512 + rope 64) and ``V = latent[..., :512]``; GQA is ``Hkv`` groups of ``H / Hkv`` heads.
Slots holding −1 are masked. Computed in query chunks so the gathered keys are O(chunk · k), and
differentiated by autograd (gather backward scatter-adds dK/dV).
"""

from __future__ import annotations

import torch

from dsa_dist.ops._checks import (
    check_attention_qkv,
    check_dim,
    check_index_range,
    check_positive_int,
    check_same_device,
    check_tensor,
)


def _check_inputs(q, k, v, topk_indices, indices_checked=False):
    check_attention_qkv(q, k, v)
    check_tensor("topk_indices", topk_indices, dtypes=(torch.int32, torch.int64))
    b, lq = q.shape[:2]
    hkv = k.shape[2]
    if topk_indices.dim() not in (3, 4) or topk_indices.shape[:2] != (b, lq):
        raise ValueError(
            f"topk_indices must be [B, Lq, k] (shared by all heads) or [B, Lq, Hkv, k] with B={b}, Lq={lq}, "
            f"got {tuple(topk_indices.shape)}"
        )
    if topk_indices.dim() == 4:
        check_dim("topk_indices", topk_indices, 2, hkv, "KV groups")
    check_same_device(q=q, k=k, v=v, topk_indices=topk_indices)
    if not indices_checked:  # on the device: no host sync (CUDA: device-side assertion; CPU: ValueError)
        check_index_range("topk_indices", topk_indices, k.shape[1])


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x`` [B, L, ...] gathered at ``indices`` [B, ...idx] (−1 → row 0) → [B, ...idx, ...]."""
    b = x.shape[0]
    flat = indices.clamp_min(0).long().reshape(b, -1)
    batch = torch.arange(b, device=x.device)[:, None]
    return x[batch, flat].reshape(*indices.shape, *x.shape[2:])


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_indices: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    chunk_size: int = 256,
    indices_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query restricted to its selected keys.

    Args:
        q: [B, Lq, H, d_qk]
        k: [B, Lk, Hkv, d_qk]
        v: [B, Lk, Hkv, d_v]   (d_v may differ from d_qk, e.g. MLA 576/512)
        topk_indices: [B, Lq, k] shared by all heads, or [B, Lq, Hkv, k] per KV group; int32/int64 rows of
            k/v (< Lk), −1 for an empty slot; anything else raises ValueError.
        softmax_scale: default ``d_qk ** -0.5``.
        indices_checked: the caller guarantees the index range (internal callers whose indices are in range by
            construction: our own top-k, validated replays); skips the range check. Default False: checked.

    Returns:
        ``(out [B, Lq, H, d_v] in q's dtype, lse [B, Lq, H] float32 — float64 for float64 inputs)`` —
        natural-log sum-exp of the scaled logits over the selected keys (−inf for a row with no valid key,
        whose output is 0).
    """
    _check_inputs(q, k, v, topk_indices, indices_checked)
    check_positive_int("chunk_size", chunk_size)
    b, lq, h, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    group = h // hkv
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    per_group = topk_indices.dim() == 4
    outs, lses = [], []
    for start in range(0, lq, chunk_size):
        end = min(start + chunk_size, lq)
        idx = topk_indices[:, start:end]  # [B, c, k] or [B, c, Hkv, k]
        c = end - start
        qc = q[:, start:end].to(compute).reshape(b, c, hkv, group, d)
        if per_group:
            idx_g = idx.permute(0, 1, 3, 2)  # [B, c, k, Hkv]
            heads = torch.arange(hkv, device=q.device)
            flat = idx_g.clamp_min(0).long()
            bi = torch.arange(b, device=q.device)[:, None, None, None]
            k_sel = k[bi, flat, heads].to(compute)  # [B, c, k, Hkv, d]
            v_sel = v[bi, flat, heads].to(compute)
            valid = (idx_g >= 0).permute(0, 1, 3, 2)  # [B, c, Hkv, k]
        else:
            k_sel = gather_rows(k, idx).to(compute)  # [B, c, k, Hkv, d]
            v_sel = gather_rows(v, idx).to(compute)
            valid = (idx >= 0)[:, :, None, :].expand(b, c, hkv, idx.shape[-1])
        logits = torch.einsum("bcgjd,bckgd->bcgjk", qc, k_sel) * scale  # [B, c, Hkv, G, k]
        valid = valid[:, :, :, None, :]
        has_any = valid.any(-1, keepdim=True)
        # A row with no valid key gets finite dummy logits so that neither forward nor backward sees
        # −inf − (−inf); its probabilities are zeroed below and its lse reported as −inf.
        logits = torch.where(valid, logits, torch.where(has_any, float("-inf"), 0.0))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        probs = torch.exp(logits - lse) * valid
        out = torch.einsum("bcgjk,bckgd->bcgjd", probs, v_sel)
        outs.append(out.reshape(b, c, h, dv))
        lses.append(torch.where(has_any, lse, float("-inf")).reshape(b, c, h))
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 1).to(compute)


def sparse_attention_flops(tokens: int, heads: int, topk: int, d_qk: int, d_v: int) -> float:
    """Forward FLOPs: 2·H·k·(d_qk + d_v) per query (docs/design.md, "Cost"). Backward is 2.5× this."""
    return 2.0 * tokens * heads * topk * (d_qk + d_v)
