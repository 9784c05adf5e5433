"""Block-scaled FP8 (e4m3) quantisation used by the lightning indexer (docs/design.md, "Lightning indexer").

One fp32 scale per block of ``block_size`` consecutive values along the last dim (128 in V3.2: one scale per
indexer head vector and one per index key). ``scale = max(amax, amax_floor) / 448``, optionally rounded *up*
to a power of two (``ue8m0``) so it can be stored as an exponent byte; values are clamped to ±448.
The Triton kernel (``kernels/fp8_quant.py``) computes the same bits; :func:`fp8_fake_quant` quantises through
:mod:`dsa_dist.ops.dispatch`, so on CUDA it runs that kernel.
"""

from __future__ import annotations

import torch

from dsa_dist.ops import dispatch
from dsa_dist.ops._checks import FLOAT_DTYPES, check_positive_int, check_tensor

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4


def fp8_block_quant(
    x: torch.Tensor,
    block_size: int = 128,
    *,
    ue8m0: bool = False,
    amax_floor: float = AMAX_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` [..., D] to e4m3 with one fp32 scale per ``block_size`` values.

    Returns ``(x_fp8 [..., D] float8_e4m3fn, scale [..., D // block_size] float32)`` with
    ``x ≈ x_fp8.float() * scale`` blockwise.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_positive_int("block_size", block_size)
    if x.dim() == 0 or x.shape[-1] % block_size != 0:
        raise ValueError(
            f"x's last dim must be a multiple of block_size={block_size}, got shape {tuple(x.shape)}"
        )
    if amax_floor <= 0:
        raise ValueError(f"amax_floor must be > 0, got {amax_floor}")
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    amax = blocks.abs().amax(dim=-1).clamp_min(amax_floor)
    scale = amax / E4M3_MAX
    if ue8m0:
        scale = round_up_to_power_of_two(scale)
    q = (blocks / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale


def round_up_to_power_of_two(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ≥ ``x`` for positive fp32 ``x``, exactly, from the float bits.

    Keep the exponent field and add one to it when any mantissa bit is set. ``exp2(ceil(log2(x)))`` is not
    exact: fp32 ``log2`` returns an integer for x one or two ulps above a power of two and so rounds *down*
    (e.g. x = 2^-10·(1 + 2^-23)). Subnormal x round up to 2^-126, as in the kernel.
    """
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    exponent = bits & 0x7F800000
    exponent = torch.where((bits & 0x007FFFFF) != 0, exponent + 0x00800000, exponent)
    return exponent.view(torch.float32)


def fp8_block_dequant(
    x_fp8: torch.Tensor, scale: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`fp8_block_quant`: ``x_fp8 [..., D]``, ``scale [..., D // block_size]`` → ``[..., D]``."""
    check_tensor("x_fp8", x_fp8, dtypes=(torch.float8_e4m3fn,))
    check_tensor("scale", scale, dtypes=(torch.float32,))
    if x_fp8.shape[-1] % block_size != 0 or scale.shape != (*x_fp8.shape[:-1], x_fp8.shape[-1] // block_size):
        raise ValueError(
            f"scale must have shape {(*x_fp8.shape[:-1], x_fp8.shape[-1] // block_size)} for x_fp8 "
            f"{tuple(x_fp8.shape)} and block_size={block_size}, got {tuple(scale.shape)}"
        )
    blocks = x_fp8.float().reshape(*scale.shape, block_size) * scale.unsqueeze(-1)
    return blocks.reshape(x_fp8.shape).to(dtype)


def fp8_fake_quant(x: torch.Tensor, block_size: int = 128, *, ue8m0: bool = False) -> torch.Tensor:
    """Quantise-dequantise with a straight-through gradient (simulated FP8 for differentiable paths)."""
    q, s = dispatch.fp8_block_quant(x.detach(), block_size, ue8m0=ue8m0)
    return x + (fp8_block_dequant(q, s, block_size, dtype=x.dtype) - x).detach()
