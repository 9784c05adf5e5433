"""Dense causal attention that also returns the per-head log-sum-exp (stage-1 target, DSA ``dense`` mode).

The PyTorch reference: the ground truth, and what runs on CPU. Causality is on global positions
(``q_positions``, ``k_positions``, or the runs ``q_blocks``) so a context-parallel shard attends its own queries
over the all-gathered keys. Chunked over queries and recomputed per chunk in backward: memory O(chunk · H · Lk)
in forward and backward, never H × L × L. On CUDA, :func:`dsa_dist.ops.dispatch.dense_attention` runs the fused
version (:mod:`dsa_dist.ops.fused_dense`: PyTorch's flash / memory-efficient kernels, same contract).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsa_dist.ops._checks import check_attention_qkv, check_positions, check_positive_int
from dsa_dist.ops.position_blocks import PositionBlocks, check_blocks, positions_from_blocks


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    q_blocks: PositionBlocks | None = None,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention: ``q`` [B, Lq, H, d_qk], ``k`` [B, Lk, Hkv, d_qk], ``v`` [B, Lk, Hkv, d_v].

    Returns ``(out [B, Lq, H, d_v] in q's dtype, lse [B, Lq, H] float32 — float64 for float64 inputs)``, the lse
    in natural log of the scaled logits; key s is visible to query t iff ``k_positions[s] <= q_positions[t]``
    (default positions: arange). A query with no visible key gets lse −inf and output 0.
    ``q_blocks`` ``((start, length), ...)``: the query positions as runs of consecutive positions (keys at
    ``arange(Lk)``; instead of ``q_positions``/``k_positions``) — the form the fused CUDA path needs to stay
    free of host synchronisation (:mod:`dsa_dist.ops.position_blocks`).
    """
    check_attention_qkv(q, k, v)
    check_positive_int("chunk_size", chunk_size)
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    if q_blocks is not None:
        if q_positions is not None or k_positions is not None:
            raise ValueError("q_blocks replaces q_positions (keys at 0 .. Lk-1): pass q_blocks alone, or "
                             "q_positions/k_positions without q_blocks")
        q_positions = positions_from_blocks(check_blocks("q_blocks", q_blocks, lq), q.device)
    q_pos = check_positions("q_positions", q_positions, lq, q.device)
    k_pos = check_positions("k_positions", k_positions, k.shape[1], q.device)
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    def chunk(start: int, end: int, q_c, k_, v_):
        c = end - start
        qc = q_c.to(compute).reshape(b, c, hkv, h // hkv, d)
        logits = torch.einsum("bcgjd,bkgd->bcgjk", qc, k_.to(compute)) * scale  # [B, c, Hkv, G, Lk]
        visible = k_pos[None, :] <= q_pos[start:end, None]  # [c, Lk]
        has_any = visible.any(-1)[None, :, None, None, None]
        mask = visible[None, :, None, None, :]
        logits = torch.where(mask, logits, torch.where(has_any, float("-inf"), 0.0))
        lse = torch.logsumexp(logits, -1, keepdim=True)
        probs = torch.exp(logits - lse) * mask
        out = torch.einsum("bcgjk,bkgd->bcgjd", probs, v_.to(compute))
        return out.reshape(b, c, h, v.shape[-1]), torch.where(has_any, lse, float("-inf")).reshape(b, c, h)

    outs, lses = [], []
    for start in range(0, lq, chunk_size):
        end = min(start + chunk_size, lq)
        # Recompute each chunk in backward: autograd would otherwise keep every chunk's [c, H, Lk] logits and
        # probabilities alive at once — O(H · L²) memory, which is what the chunking is meant to avoid.
        out, lse = checkpoint(chunk, start, end, q[:, start:end], k, v, use_reentrant=False)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 1).to(compute)
