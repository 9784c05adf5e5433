"""Triton block-scaled FP8 (e4m3) quantisation for the lightning indexer (docs/design.md, "Lightning indexer").

Same function as :func:`dsa_dist.ops.fp8.fp8_block_quant`: one fp32 scale per ``block_size`` consecutive values
along the last dim, ``scale = max(amax, amax_floor) / 448`` (optionally rounded *up* to a power of two, ue8m0),
``x_fp8 = clamp(x / scale, ±448)`` rounded to nearest-even e4m3. One program quantises ``ROWS`` blocks: one read
of ``x`` and one write of the fp8 values and scales, so the kernel is bound by memory bandwidth.

The scale is computed the way the reference computes it on the same device (torch divides by a scalar through
its reciprocal on CUDA, exactly on CPU), so values and scales match the reference bit for bit on both.
ue8m0 rounding is done on the exponent bits (round up unless the mantissa is zero), which is what
``exp2(ceil(log2(scale)))`` means; it avoids the one-ulp misrounding ``log2`` can give just above a power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_launchable, check_positive_int, check_tensor

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # the reference op's default: an all-zero block gets scale 1e-4 / 448, not 0


@triton.jit
def _e4m3_bits_rne(y):
    """e4m3fn bit pattern (uint8) of fp32 ``y`` with |y| ≤ 448, round to nearest even, in integer math.

    Used under the CPU interpreter, whose own fp32→fp8 cast does not round to nearest; on the GPU the
    hardware ``cvt.rn.satfinite`` gives the same bits.
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = tl.abs(y)
    # subnormals (|y| < 2^-6): code = rne(|y| · 2^9), exact scaling by a power of two; 8 becomes the min normal
    xs = a * 512.0
    fl = tl.floor(xs)
    fr = xs - fl
    fl_i = fl.to(tl.int32)
    sub = fl_i + ((fr > 0.5) | ((fr == 0.5) & ((fl_i & 1) == 1))).to(tl.int32)
    # normals: keep 3 mantissa bits, round the 20 dropped bits to nearest even (carry may bump the exponent)
    abits = a.to(tl.int32, bitcast=True)
    exp = (abits >> 23) - 127
    m3 = (abits >> 20) & 7
    rem = abits & 0xFFFFF
    up = (rem > 0x80000) | ((rem == 0x80000) & ((m3 & 1) == 1))
    nrm = ((exp + 7) << 3) + m3 + up.to(tl.int32)
    code = tl.where(a < 0.015625, sub, nrm) | (sign << 7)
    return code.to(tl.uint8)


@triton.jit
def _fp8_block_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    n_blocks,
    block_size,
    amax_floor,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    UE8M0: tl.constexpr,
    SOFT_CVT: tl.constexpr,
    RECIP: tl.constexpr,
):
    # x / q are viewed as [n_blocks, block_size] row-major; s is [n_blocks].
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_blocks) & (cols[None, :] < block_size)
    offs = rows[:, None].to(tl.int64) * block_size + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor)
    if RECIP:
        scale = amax * (1.0 / 448.0)  # torch on CUDA divides by a scalar as a multiply by its fp32 reciprocal
    else:
        scale = tl.math.div_rn(amax, 448.0)  # torch on CPU divides exactly
    if UE8M0:
        # Round up to a power of two on the bits: keep the exponent, add one if any mantissa bit is set.
        bits = scale.to(tl.int32, bitcast=True)
        exp_bits = bits & 0x7F800000
        exp_bits = tl.where((bits & 0x007FFFFF) != 0, exp_bits + 0x00800000, exp_bits)
        scale = exp_bits.to(tl.float32, bitcast=True)
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if SOFT_CVT:
        tl.store(q_ptr + offs, _e4m3_bits_rne(y), mask=mask)
    else:
        tl.store(q_ptr + offs, y.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rows < n_blocks)


def fp8_block_quant(
    x: torch.Tensor,
    block_size: int = 128,
    *,
    ue8m0: bool = False,
    amax_floor: float = AMAX_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` [..., D] (fp16/bf16/fp32/fp64) to e4m3 with one fp32 scale per ``block_size`` values.

    Returns ``(x_fp8 [..., D] float8_e4m3fn, scale [..., D // block_size] float32)`` with
    ``x ≈ x_fp8.float() * scale`` blockwise. ``D`` must be a multiple of ``block_size``. Not differentiable
    (use :func:`dsa_dist.ops.fp8_fake_quant` for a straight-through path). CUDA tensors, or CPU tensors under
    Triton's interpreter.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_positive_int("block_size", block_size)
    if x.dim() == 0 or x.shape[-1] % block_size != 0:
        raise ValueError(f"x's last dim must be a multiple of block_size={block_size}, got shape {tuple(x.shape)}")
    if amax_floor <= 0:
        raise ValueError(f"amax_floor must be > 0, got {amax_floor}")
    check_launchable(_fp8_block_quant_kernel, x)
    xc = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(*x.shape[:-1], x.shape[-1] // block_size, dtype=torch.float32, device=x.device)
    n_blocks = scale.numel()
    if n_blocks == 0:
        return q, scale
    block = triton.next_power_of_2(block_size)
    rows = max(1, min(64, 4096 // block))  # ~4K values per program: enough bytes in flight per SM
    grid = (triton.cdiv(n_blocks, rows),)
    soft = not x.is_cuda  # interpreter: its fp8 cast does not round to nearest even
    _fp8_block_quant_kernel[grid](
        xc, q.view(torch.uint8) if soft else q, scale, n_blocks, block_size, float(amax_floor),
        ROWS=rows, BLOCK=block, UE8M0=bool(ue8m0), SOFT_CVT=soft, RECIP=x.is_cuda, num_warps=4,
    )
    return q, scale
