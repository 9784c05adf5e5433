"""FP8 block quantisation, rotary (rotate-half) and Hadamard against naive float64 math."""

import math

import pytest
import torch

from dsa_dist.ops import apply_rope, fp8_block_dequant, fp8_block_quant, fp8_fake_quant, hadamard_transform
from dsa_dist.ops.fp8 import E4M3_MAX
from tests._inputs import rope_reference


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


def _pow2_at_or_above(v: float) -> float:
    m, e = math.frexp(v)  # exact: v = m · 2^e with 0.5 <= m < 1
    return 2.0 ** (e - 1) if m == 0.5 else 2.0**e


def test_ue8m0_scales_are_the_next_power_of_two_exactly():
    x = torch.randn(10, 128) * 37.0
    _, scale = fp8_block_quant(x, 128, ue8m0=True)
    _, plain = fp8_block_quant(x, 128)
    assert scale.flatten().tolist() == [_pow2_at_or_above(v) for v in plain.flatten().tolist()]
    # amax/448 one or two ulps above 2^-10: exp2(ceil(log2(.))) gave 2^-10 here (a scale below amax/448)
    x = torch.zeros(1, 128)
    x[0, 0] = 0.4375000596046448
    _, scale = fp8_block_quant(x, 128, ue8m0=True)
    _, plain = fp8_block_quant(x, 128)
    assert plain.item() > 2.0**-10 and scale.item() == 2.0**-9
    # exact powers of two stay, everything near them goes up
    bits = torch.tensor([2.0**-10, 2.0**-3, 1.0, 4.0]).view(torch.int32)
    near = torch.stack([bits + d for d in (-2, -1, 0, 1, 2)], 1).flatten().view(torch.float32)
    _, scale = fp8_block_quant((near * 448.0)[:, None].expand(-1, 128).contiguous(), 128, ue8m0=True)
    _, plain = fp8_block_quant((near * 448.0)[:, None].expand(-1, 128).contiguous(), 128)
    assert scale.flatten().tolist() == [_pow2_at_or_above(v) for v in plain.flatten().tolist()]


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
    # forward: each value rounded onto the e4m3 grid of its block's scale, written out by hand
    scale = x.detach().abs().amax(-1, keepdim=True) / 448.0
    grid = (x.detach() / scale).to(torch.float8_e4m3fn).double() * scale.double()
    torch.testing.assert_close(y.detach().double(), grid, rtol=1e-6, atol=0)


def test_rope_is_rotate_half_on_first_dims():
    x = torch.randn(2, 7, 3, 24, dtype=torch.float64)
    positions = torch.tensor([0, 3, 5, 100, 101, 4000, 9])
    y = apply_rope(x, positions, rope_dim=16, base=10000.0)
    torch.testing.assert_close(y, rope_reference(x, positions, 16, 10000.0))
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
