"""Rotary embedding (non-interleaved / rotate-half) and the orthogonal Hadamard rotation for the indexer.

DSA applies RoPE to the *first* ``rope_dim`` dims of q_I and k_I in the rotate-half (NeoX) layout: pairs are
``(x[i], x[i + rope_dim/2])``. The interleaved layout ``(x[2i], x[2i+1])`` is a known bug that costs
long-context accuracy, so it is not offered.
"""

from __future__ import annotations

import math

import torch

from dsa_dist.ops._checks import FLOAT_DTYPES, check_tensor


def rope_cos_sin(
    positions: torch.Tensor, rope_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions`` [L] → each [L, rope_dim // 2] (computed in float64, cast to dtype)."""
    if rope_dim <= 0 or rope_dim % 2:
        raise ValueError(f"rope_dim must be a positive even int, got {rope_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float64, device=positions.device) / rope_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, rope_dim: int, base: float = 10000.0
) -> torch.Tensor:
    """Rotate the first ``rope_dim`` dims of ``x`` [B, L, ..., D] (rotate-half layout) at ``positions`` [L]."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2 or rope_dim > x.shape[-1]:
        raise ValueError(f"x must be [B, L, ..., D] with D >= rope_dim={rope_dim}, got {tuple(x.shape)}")
    if positions.shape != (x.shape[1],):
        raise ValueError(f"positions must have shape [{x.shape[1]}] (x's dim 1), got {tuple(positions.shape)}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(positions, rope_dim, base, compute)
    shape = [1, x.shape[1]] + [1] * (x.dim() - 3) + [rope_dim // 2]
    cos, sin = cos.view(shape), sin.view(shape)
    half = rope_dim // 2
    x1 = x[..., :half].to(compute)
    x2 = x[..., half:rope_dim].to(compute)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., rope_dim:]], dim=-1)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard rotation along the last dim (a power of two): keeps every dot product.

    Spreads outlier channels over all dims before FP8 quantisation. Fast O(D log D) butterfly.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two last dim, got {d}")
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return (y.reshape(x.shape) * (1.0 / math.sqrt(d))).to(x.dtype)
