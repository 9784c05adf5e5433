"""Triton FP8 block quantisation (kernels/fp8_quant.py) equals the reference op bit for bit (DESIGN.md §1).

CPU cases run under ``TRITON_INTERPRET=1`` in a subprocess (see tests/kernels/test_indexer_kernels.py); the GPU
test (skipped without CUDA) checks realistic sizes with fresh random inputs and poisoned outputs.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_indexer_kernels import poison_cuda_cache, run_interpreted


def _assert_same_quant(got, want):
    (q1, s1), (q2, s2) = got, want
    assert q1.dtype == torch.float8_e4m3fn and s1.dtype == torch.float32
    assert q1.shape == q2.shape and s1.shape == s2.shape
    assert torch.equal(s1, s2), (s1 - s2).abs().max()
    diff = q1.view(torch.uint8) != q2.view(torch.uint8)
    assert not diff.any(), f"{int(diff.sum())} codes differ, e.g. {q1.float()[diff][:4]} vs {q2.float()[diff][:4]}"


def _case_matches_reference():
    from dsa_dist.ops.fp8 import fp8_block_quant as ref
    from kernels.fp8_quant import fp8_block_quant

    g = torch.Generator().manual_seed(0)
    # wide dynamic range across blocks (subnormal e4m3 codes included), an all-zero block (amax floor)
    x = torch.randn(3, 5, 256, generator=g) * torch.logspace(-7, 3, 256)
    x[0, 0, :128] = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for ue8m0 in (False, True):
            xd = x.to(dtype)
            _assert_same_quant(fp8_block_quant(xd, 128, ue8m0=ue8m0), ref(xd, 128, ue8m0=ue8m0))
    # other block sizes, a non-power-of-2 one, and a custom amax floor
    for block in (32, 96):
        xb = x[..., : 192 if block == 96 else 256]
        _assert_same_quant(fp8_block_quant(xb, block, amax_floor=1e-2), ref(xb, block, amax_floor=1e-2))
    # exact round-to-nearest-even ties: with amax 448 and ue8m0 the scale is exactly 1, so x/scale is exact
    ties = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-10, 0.0, -0.0, 17.0])
    xt = torch.cat([ties, torch.zeros(128 - ties.numel())])[None]
    got = fp8_block_quant(xt, 128, ue8m0=True)
    _assert_same_quant(got, ref(xt, 128, ue8m0=True))
    assert got[1].item() == 1.0
    assert got[0][0, :7].float().tolist() == [448.0, 1.0, 1.25, -1.0, 2.0**-8, 2.0**-8, 0.0]


def test_fp8_quant_interpreted():
    run_interpreted("tests.kernels.test_fp8_quant_kernel:_case_matches_reference")


def test_fp8_quant_rejects_bad_input():
    from kernels.fp8_quant import fp8_block_quant

    with pytest.raises(ValueError, match="block_size"):
        fp8_block_quant(torch.randn(4, 100), 128)
    with pytest.raises(TypeError, match="x must have dtype"):
        fp8_block_quant(torch.zeros(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="amax_floor"):
        fp8_block_quant(torch.randn(4, 128), amax_floor=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_quant_gpu(dtype, ue8m0):
    from dsa_dist.ops.fp8 import fp8_block_quant as ref
    from kernels.fp8_quant import fp8_block_quant

    x = (torch.randn(4, 4096, 64, 128, device="cuda") * torch.rand(4, 4096, 64, 1, device="cuda") * 10).to(dtype)
    poison_cuda_cache(x.numel() * 2)
    got = fp8_block_quant(x, 128, ue8m0=ue8m0)
    _assert_same_quant(got, ref(x, 128, ue8m0=ue8m0))
