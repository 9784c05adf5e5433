"""Input builders and independent references shared by the op, kernel and model tests.

* :func:`integer_indexer_inputs` — small-integer indexer inputs: every score is an exact integer in fp32, so
  many scores tie and any tie-break or rounding difference changes the selected indices.
* :func:`all_causal_indices` / :func:`random_causal_indices` — top-k index sets (−1 = empty slot).
* :func:`rope_reference` — rotate-half rope written from the formula in float64.
* :func:`poison_cuda_cache` — makes unwritten kernel outputs show up as NaN / −1.
"""

from __future__ import annotations

import torch


def integer_indexer_inputs(b: int, lq: int, lk: int, heads: int, dim: int, dtype: torch.dtype = torch.float32,
                           seed: int = 0, device: str = "cpu"):
    """``(q_index [B, Lq, H, d], k_index [B, Lk, d], weights [B, Lq, H], k_scale [B, Lk])``: values in
    {−2..2} (q, k; exact in e4m3 too), weights in {−1..2} (negative ones included), key scales in {1, 2}."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (b, lq, heads, dim), generator=g).to(dtype)
    k = torch.randint(-2, 3, (b, lk, dim), generator=g).to(dtype)
    w = torch.randint(-1, 3, (b, lq, heads), generator=g).float()
    k_scale = (2.0 ** torch.randint(0, 2, (b, lk), generator=g)).float()
    return q.to(device), k.to(device), w.to(device), k_scale.to(device)


def all_causal_indices(b: int, lq: int, k: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Lq, k] int32 holding every causal key: row t is 0..pos[t] then −1 (with k ≥ L: dense attention)."""
    pos = torch.arange(lq) if positions is None else positions
    cols = torch.arange(k)
    idx = torch.where(cols[None, :] <= pos[:, None], cols[None, :], -1)
    return idx.expand(b, lq, k).to(torch.int32).contiguous()


def random_causal_indices(b: int, lq: int, lk: int, topk: int, gen: torch.Generator,
                          device: str | torch.device = "cpu") -> torch.Tensor:
    """Random causal top-k sets [B, Lq, k] int32 (queries are the last Lq of Lk positions); −1 where a row has
    fewer than k keys, slots shuffled so that −1 also sits between valid slots."""
    scores = torch.rand(b, lq, lk, generator=gen, device=device)
    future = torch.ones(lq, lk, dtype=torch.bool, device=device).triu(1 + lk - lq)
    vals, idx = scores.masked_fill(future, -1.0).topk(min(topk, lk), dim=-1)
    idx = torch.where(vals < 0, -1, idx)
    if idx.shape[-1] < topk:
        idx = torch.cat([idx, idx.new_full((b, lq, topk - idx.shape[-1]), -1)], -1)
    perm = torch.randperm(topk, generator=gen, device=device)
    return idx[..., perm].int()


def rope_reference(x: torch.Tensor, positions: torch.Tensor, rope_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half rope in float64 on ``x`` [B, L, ..., D]: pairs (x[i], x[i + rope_dim/2]) turned by
    ``pos · base^(−2i/rope_dim)``; dims past ``rope_dim`` unchanged."""
    half = rope_dim // 2
    x64 = x.double()
    inv = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / rope_dim)
    ang = positions.double()[:, None] * inv[None, :]  # [L, half]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 3) + [half]
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    a, b = x64[..., :half], x64[..., half:rope_dim]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, x64[..., rope_dim:]], -1)


def poison_cuda_cache(nbytes: int) -> None:
    """Fill ``nbytes`` of the caching allocator's free memory with 0xFF (NaN in fp32 and e4m3, −1 in int32) and
    release it, so outputs a kernel allocates with ``torch.empty`` start poisoned and unwritten entries show."""
    junk = torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda")
    del junk
