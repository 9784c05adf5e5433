"""Triton FP8 block quantisation (kernels/fp8_quant.py) equals the reference op bit for bit.

CPU cases run under Triton's interpreter in one subprocess (tests/_interpret.py); the GPU test (``-m gpu``)
checks realistic sizes with fresh random inputs and poisoned outputs.
"""

from __future__ import annotations

import pytest
import torch

from tests._inputs import poison_cuda_cache
from tests._interpret import check_interpreted, run_interpreted


def _assert_same_quant(got, want):
    (q1, s1), (q2, s2) = got, want
    assert q1.dtype == torch.float8_e4m3fn and s1.dtype == torch.float32
    assert q1.shape == q2.shape and s1.shape == s2.shape
    assert torch.equal(s1, s2), (s1 - s2).abs().max()
    diff = q1.view(torch.uint8) != q2.view(torch.uint8)
    assert not diff.any(), f"{int(diff.sum())} codes differ, e.g. {q1.float()[diff][:4]} vs {q2.float()[diff][:4]}"


def _pow2_at_or_above(v: float) -> float:
    """Smallest power of two ≥ v > 0, from Python's exact frexp (v = m·2^e, 0.5 ≤ m < 1)."""
    import math

    m, e = math.frexp(v)
    return 2.0 ** (e - 1) if m == 0.5 else 2.0**e


# ---------------------------------------------------------------------------------------------- interpreter cases
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


def _case_ue8m0_just_above_powers_of_two():
    """amax/448 one or a few ulps above a power of two: the ue8m0 scale is the next power of two, in the kernel
    and the reference alike (exp2(ceil(log2)) used to round these down, a 2x difference)."""
    from dsa_dist.ops.fp8 import fp8_block_quant as ref
    from kernels.fp8_quant import fp8_block_quant

    x = torch.zeros(1, 128)
    x[0, 0] = 0.4375000596046448  # 448 · 2^-10 plus 2 ulps: amax / 448 lies 1-2 ulps above 2^-10
    got = fp8_block_quant(x, 128, ue8m0=True)
    _assert_same_quant(got, ref(x, 128, ue8m0=True))
    assert got[1].item() == 2.0**-9
    # random blocks whose amax/448 is 0..4 ulps above (and just below) 2^e for many e, random signs
    g = torch.Generator().manual_seed(1)
    exps = torch.randint(-20, 20, (256,), generator=g).float()  # amax = 448·2^e stays above the 1e-4 floor
    ulps = torch.randint(-2, 5, (256,), generator=g)
    target = torch.exp2(exps)  # the power of two amax/448 should sit near
    scale_bits = target.view(torch.int32) + ulps.int()
    amax = scale_bits.view(torch.float32) * 448.0  # multiplication by 448 = 7·2^6 may round: the exact value matters
    blocks = torch.rand(256, 128, generator=g) * amax[:, None] * 0.99
    blocks[torch.arange(256), torch.randint(0, 128, (256,), generator=g)] = amax
    blocks = blocks * torch.where(torch.rand(256, 128, generator=g) < 0.5, -1.0, 1.0)
    got = fp8_block_quant(blocks, 128, ue8m0=True)
    _assert_same_quant(got, ref(blocks, 128, ue8m0=True))
    plain = (blocks.abs().amax(-1).clamp_min(1e-4) / 448.0).tolist()
    assert got[1].squeeze(-1).tolist() == [_pow2_at_or_above(v) for v in plain]


CASES = ["_case_matches_reference", "_case_ue8m0_just_above_powers_of_two"]


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__name__, CASES)


@pytest.mark.parametrize("case", CASES)
def test_fp8_quant_interpreted(interpreted, case):
    check_interpreted(interpreted, case)


def test_fp8_quant_rejects_bad_input():
    from kernels.fp8_quant import fp8_block_quant

    with pytest.raises(ValueError, match="block_size"):
        fp8_block_quant(torch.randn(4, 100), 128)
    with pytest.raises(TypeError, match="x must have dtype"):
        fp8_block_quant(torch.zeros(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="amax_floor"):
        fp8_block_quant(torch.randn(4, 128), amax_floor=0.0)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_quant_gpu(dtype, ue8m0, gpu_seed):
    from dsa_dist.ops.fp8 import fp8_block_quant as ref
    from kernels.fp8_quant import fp8_block_quant

    x = (torch.randn(4, 4096, 64, 128, device="cuda") * torch.rand(4, 4096, 64, 1, device="cuda") * 10).to(dtype)
    poison_cuda_cache(x.numel() * 2)
    got = fp8_block_quant(x, 128, ue8m0=ue8m0)
    _assert_same_quant(got, ref(x, 128, ue8m0=ue8m0))


@pytest.mark.gpu
def test_model_fp8_quantisation_runs_the_kernel(monkeypatch, gpu_seed):
    """prepare_indexer_qk quantises through dispatch: on CUDA the Triton kernel runs, with the reference's bits."""
    import kernels.fp8_quant as kq
    from dsa_dist.ops import dispatch, prepare_indexer_qk
    from dsa_dist.ops.fp8 import fp8_block_quant as ref

    monkeypatch.delenv("DSA_BACKEND", raising=False)
    calls = []
    real = kq.fp8_block_quant
    monkeypatch.setattr(kq, "fp8_block_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = torch.randn(1, 256, 8, 128, device="cuda")
    k = torch.randn(1, 256, 128, device="cuda")
    w = torch.randn(1, 256, 8, device="cuda")
    before = dispatch.reference_fallbacks()
    prep = prepare_indexer_qk(q, k, w, rope_dim=0, fp8=True, ue8m0=True)
    assert len(calls) == 2 and dispatch.reference_fallbacks() == before
    k8, ks = ref(k, 128, ue8m0=True)
    assert torch.equal(prep.k_index.view(torch.uint8), k8.view(torch.uint8)) and torch.equal(prep.k_scale, ks[..., 0])
