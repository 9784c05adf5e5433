"""FP8 block quantisation, rotary (rotate-half) and Hadamard against naive float64 math."""

import math

import pytest
import torch

from dsa_dist.ops import apply_rope, fp8_block_dequant, fp8_block_quant, fp8_fake_quant, hadamard_transform
from dsa_dist.ops.fp8 import E4M3_MAX


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_round_trip_within_e4m3_bounds(block, ue8m0):
    x = torch.randn(6, 5, 256) * torch.logspace(-3, 3, 256)  # wide dynamic range across blocks
    q, scale = fp8_block_quant(x, block, ue8m0=ue8m0)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 5, 256 // block)
    back = fp8_block_dequant(q, scale, block)
    blocks = x.reshape(6, 5, -1, block)
    amax = blocks.abs().amax(-1).clamp_min(1e-4)
    # e4m3 has 3 mantissa bits: relative rounding error ≤ 2^-4 for normals; subnormals (below 2^-6 · scale)
    # are spaced 2^-9 · scale apart, so the absolute error there is ≤ 2^-10 · scale.
    err = (back - x).abs().reshape(6, 5, -1, block)
    bound = torch.maximum(blocks.abs() * 2.0**-4, scale[..., None] * 2.0**-10) * 1.0001
    assert (err <= bound).all()
    # the scale maps amax onto at most 448 (exactly 448 without ue8m0)
    assert (amax / scale <= E4M3_MAX * (1 + 1e-6)).all()
    if not ue8m0:
        torch.testing.assert_close(amax / scale, torch.full_like(amax, E4M3_MAX))


def test_ue8m0_scales_are_powers_of_two_and_round_up():
    x = torch.randn(10, 128) * 37.0
    _, scale = fp8_block_quant(x, 128, ue8m0=True)
    exponent = torch.log2(scale)
    torch.testing.assert_close(exponent, exponent.round(), rtol=0, atol=0)
    _, plain = fp8_block_quant(x, 128)
    assert (scale >= plain).all() and (scale < 2 * plain).all()


def test_amax_floor_and_clamp():
    zeros = torch.zeros(2, 128)
    q, scale = fp8_block_quant(zeros, 128)
    torch.testing.assert_close(scale, torch.full((2, 1), 1e-4 / E4M3_MAX))
    assert (q.float() == 0).all()


def test_fake_quant_straight_through_gradient():
    x = torch.randn(4, 128, requires_grad=True)
    y = fp8_fake_quant(x, 128)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    q, s = fp8_block_quant(x.detach(), 128)
    torch.testing.assert_close(y.detach(), fp8_block_dequant(q, s, 128))


def _naive_rope(x, positions, rope_dim, base):
    out = x.clone()
    half = rope_dim // 2
    for t, p in enumerate(positions.tolist()):
        for i in range(half):
            theta = p * base ** (-2.0 * i / rope_dim)
            a, b = x[:, t, ..., i], x[:, t, ..., i + half]
            out[:, t, ..., i] = a * math.cos(theta) - b * math.sin(theta)
            out[:, t, ..., i + half] = b * math.cos(theta) + a * math.sin(theta)
    return out


def test_rope_is_rotate_half_on_first_dims():
    x = torch.randn(2, 7, 3, 24, dtype=torch.float64)
    positions = torch.tensor([0, 3, 5, 100, 101, 4000, 9])
    y = apply_rope(x, positions, rope_dim=16, base=10000.0)
    torch.testing.assert_close(y, _naive_rope(x, positions, 16, 10000.0))
    torch.testing.assert_close(y[..., 16:], x[..., 16:])  # dims past rope_dim untouched


def test_rope_relative_property():
    """q·k after rope depends only on the position difference (rotate-half preserves it)."""
    q, k = torch.randn(1, 1, 64, dtype=torch.float64), torch.randn(1, 1, 64, dtype=torch.float64)
    dots = []
    for shift in (0, 17, 1000):
        rq = apply_rope(q, torch.tensor([10 + shift]), 64)
        rk = apply_rope(k, torch.tensor([3 + shift]), 64)
        dots.append((rq * rk).sum().item())
    assert dots[0] == pytest.approx(dots[1], rel=1e-10) and dots[0] == pytest.approx(dots[2], rel=1e-9)


def test_hadamard_matches_matrix_and_is_orthogonal():
    d = 16
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(d)
    x = torch.randn(5, 3, d, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ h.T)
    y = torch.randn(5, 3, d, dtype=torch.float64)
    torch.testing.assert_close((hadamard_transform(x) * hadamard_transform(y)).sum(-1), (x * y).sum(-1))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.randn(3, 12))
