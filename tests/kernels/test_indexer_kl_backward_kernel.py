"""The indexer KL backward kernels (kernels/indexer_kl_backward.py), both implementations, against float64.

The sparse stage's entry (``indexer_kl_sparse_from_target``: target p given, as the fused attention backward
writes it) and the two losses, with q_index / k_index in fp32, bf16 and fp16. The accuracy rule: the kernel's
error against the float64 reference is at most 2× that of plain PyTorch computing the same loss in the inputs'
dtype (bf16 matmuls, bf16 autograd), plus a small floor. v2's dots take the inputs' precision (bf16 operands,
the gradient coefficients rounded to bf16), so with bf16 inputs it is measured against plain bf16 PyTorch; the
legacy kernel (fp32 dots) and fp32 inputs also meet the fp32 rule of tests/kernels/test_indexer_kl_kernel.py.

CPU cases run under Triton's interpreter in one subprocess (tests/_interpret.py; its bf16 dot is wrong, so the
kernel holds the bf16-rounded operands in fp32 there — the same values as on the GPU). GPU tests (``-m gpu``):
V3.2-like (H_I = 64 × d_I = 128, k = 512, L = 2K) and small (H_I = 8 × d_I = 64) shapes, fresh random inputs
(seed logged), outputs allocated from a NaN-poisoned cache.
"""

from __future__ import annotations

import pytest
import torch

from tests._inputs import poison_cuda_cache, random_causal_indices
from tests._interpret import check_interpreted, run_interpreted

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _problem(b, length, hi, di, topk, dtype, seed, device="cpu"):
    """Indexer inputs in ``dtype`` (weights fp32 holding bf16 values, so every variant sees the same numbers),
    random causal top-k sets with −1 slots (and one row without keys), and a target: per row a softmax over its
    valid slots, 0 elsewhere — what the attention's head-mean p looks like to this kernel."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    qi = rnd(b, length, hi, di).to(dtype)
    ki = rnd(b, length, di).to(dtype)
    w = rnd(b, length, hi, scale=1.0 / hi).bfloat16().float()
    idx = random_causal_indices(b, length, length, topk, g, device)
    idx[-1, length // 2] = -1  # a row without keys: no loss, no gradient, no NaN
    logits = rnd(b, length, topk, scale=2.0).masked_fill(idx < 0, float("-inf"))
    target = torch.softmax(logits, -1).nan_to_num(0.0)
    return target, qi, ki, w, idx


def _kernel(target, qi, ki, w, idx, impl):
    """KL value and fp32 gradients (q_index, k_index, weights) of the mean KL from the Triton kernels."""
    from kernels import indexer_kl_backward
    from kernels.indexer_kl import indexer_kl_sparse_from_target

    saved, indexer_kl_backward.KL_BWD_IMPL = indexer_kl_backward.KL_BWD_IMPL, impl
    try:
        kl, dqi, dki, dw = indexer_kl_sparse_from_target(target, qi, ki, w, None, idx, torch.ones((), device=qi.device))
    finally:
        indexer_kl_backward.KL_BWD_IMPL = saved
    return kl, [dqi, dki, dw]


def _torch(target, qi, ki, w, idx, compute):
    """The same KL and gradients from plain PyTorch computing the indexer side in ``compute`` (float64: the
    reference); the target stays in its own dtype (fp32 as the attention writes it; promoted in the KL terms)."""
    from dsa_dist.ops.kl import _row_kl, sparse_index_logits

    leaves = [x.detach().clone().requires_grad_() for x in (qi, ki, w)]
    kl = _row_kl(target, sparse_index_logits(*leaves, None, idx, compute)).mean()
    kl.backward()
    return kl.detach(), [x.grad for x in leaves]


def _accuracy(target, qi, ki, w, idx, impl, floor=1e-6):
    """{name: (kernel error, plain-PyTorch error)} against float64 for the KL value and the three gradients."""
    got, got_g = _kernel(target, qi, ki, w, idx, impl)
    base, base_g = _torch(target, qi, ki, w, idx, qi.dtype)
    want, want_g = _torch(target.double(), qi.double(), ki.double(), w.double(), idx, torch.float64)
    report = {"kl": (_rel(got, want), _rel(base, want))}
    for name, a, b0, ref in zip(("dq_index", "dk_index", "dweights"), got_g, base_g, want_g):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        report[name] = (_rel(a, ref), _rel(b0, ref))
    print(impl, qi.dtype, {n: f"kernel {a:.2e} / torch {b:.2e}" for n, (a, b) in report.items()})
    for name, (err, base_err) in report.items():
        assert err <= 2 * base_err + floor, (impl, qi.dtype, name, err, base_err)
    return report


def _case_from_target(dtype_name):
    """Both kernels, padded dims (H_I = 3 → 16, d_I = 24 → 32), −1 slots between valid ones, a row without keys,
    several key blocks per row; bf16/fp16 rounding of v2 stays within 2× of plain PyTorch in that dtype."""
    target, qi, ki, w, idx = _problem(2, 40, 3, 24, 20, DTYPES[dtype_name], seed=5)
    reports = {impl: _accuracy(target, qi, ki, w, idx, impl) for impl in ("v2", "legacy")}
    if dtype_name == "fp32":  # no operand rounding: both at fp32 level
        assert all(err < 1e-5 for r in reports.values() for err, _ in r.values()), reports
    else:  # v2 rounds only the gradient coefficients (bf16/fp16, 2^-9 / 2^-12): far below plain PyTorch's error
        assert all(err < 1e-2 for err, _ in reports["v2"].values()), reports["v2"]


def _case_losses_legacy():
    """The legacy kernel through both losses' autograd (the interpreted cases of test_indexer_kl_kernel.py run v2,
    the default)."""
    from kernels import indexer_kl_backward
    from tests.kernels.test_indexer_kl_kernel import _case_dense, _case_sparse

    saved, indexer_kl_backward.KL_BWD_IMPL = indexer_kl_backward.KL_BWD_IMPL, "legacy"
    try:
        _case_dense()
        _case_sparse()
    finally:
        indexer_kl_backward.KL_BWD_IMPL = saved


def _case_dense_bf16():
    """The dense warm-up loss with bf16 indexer inputs (v2's bf16 operands on the dense path, p recomputed from q,
    k and the lse): gradients (returned in bf16) within bf16 rounding of float64 on the same values."""
    from dsa_dist.ops import kl as ref
    from dsa_dist.ops.dense_attention import dense_attention
    from kernels.indexer_kl import indexer_kl_loss_dense

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 24, h, 16, generator=g) for h in (4, 2, 2))
    qi, ki = torch.randn(1, 24, 3, 24, generator=g).bfloat16(), torch.randn(1, 24, 24, generator=g).bfloat16()
    w = (torch.randn(1, 24, 3, generator=g) / 3).bfloat16().float()
    _, lse = dense_attention(q, k, v)
    got = [x.clone().requires_grad_() for x in (qi, ki, w)]
    indexer_kl_loss_dense(q, k, *got, attn_lse=lse).backward()
    want = [x.double().requires_grad_() for x in (qi, ki, w)]
    ref.indexer_kl_loss_dense(q.double(), k.double(), *want, attn_lse=lse.double()).backward()
    for name, a, b in zip(("dq_index", "dk_index", "dweights"), got, want):
        print("dense bf16", name, _rel(a.grad, b.grad))
        assert a.grad.dtype == a.dtype and _rel(a.grad, b.grad) < 1e-2, (name, _rel(a.grad, b.grad))


def _case_bad_impl():
    target, qi, ki, w, idx = _problem(1, 8, 2, 16, 4, torch.float32, seed=6)
    try:
        _kernel(target, qi, ki, w, idx, "v3")
    except ValueError as exc:
        assert "KL_BWD_IMPL" in str(exc) and "'v2'" in str(exc), exc
    else:
        raise AssertionError("an unknown KL backward impl was accepted")


CASES = ["_case_from_target:fp32", "_case_from_target:bf16", "_case_from_target:fp16", "_case_dense_bf16",
         "_case_losses_legacy", "_case_bad_impl"]


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__name__, CASES)


@pytest.mark.parametrize("case", CASES)
def test_indexer_kl_backward_interpreted(interpreted, case):
    check_interpreted(interpreted, case)


# ---------------------------------------------------------------------------------------------------------------
# GPU: fresh inputs, NaN-poisoned outputs, kernel error vs float64 ≤ 2× plain PyTorch's in the inputs' dtype
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["v2", "legacy"])
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", ["v32", "small"])
def test_indexer_kl_backward_gpu(gpu_seed, shape, dtype_name, impl):
    hi, di = (64, 128) if shape == "v32" else (8, 64)
    target, qi, ki, w, idx = _problem(1, 2048, hi, di, 512, DTYPES[dtype_name], gpu_seed, device="cuda")
    poison_cuda_cache(2**30)  # dq_index / dweights come from torch.empty: an unwritten entry stays NaN
    _accuracy(target, qi, ki, w, idx, impl)
    if impl == "v2":  # the two kernels agree to v2's operand rounding
        got = _kernel(target, qi, ki, w, idx, "v2")[1]
        legacy = _kernel(target, qi, ki, w, idx, "legacy")[1]
        tol = 1e-5 if dtype_name == "fp32" else 1e-2
        for name, a, b in zip(("dq_index", "dk_index", "dweights"), got, legacy):
            assert _rel(a, b) < tol, (name, _rel(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", ["v32", "small"])
def test_indexer_kl_backward_v2_tiles_gpu(gpu_seed, shape):
    """Every tile configuration the benchmark's ``--v2-sweep`` times gives v2's results (to accumulation order),
    so whichever is fastest can become ``KL_BWD_V2_TILES``."""
    from kernels import indexer_kl_backward

    hi, di = (64, 128) if shape == "v32" else (8, 64)
    target, qi, ki, w, idx = _problem(1, 1024, hi, di, 512, torch.bfloat16, gpu_seed, device="cuda")
    want = _torch(target.double(), qi.double(), ki.double(), w.double(), idx, torch.float64)[1]
    saved = dict(indexer_kl_backward.KL_BWD_V2_TILES)
    try:
        for tiles in indexer_kl_backward.KL_BWD_V2_SWEEP:
            indexer_kl_backward.KL_BWD_V2_TILES.update(tiles)
            poison_cuda_cache(2**28)
            got = _kernel(target, qi, ki, w, idx, "v2")[1]
            for name, a, b in zip(("dq_index", "dk_index", "dweights"), got, want):
                assert torch.isfinite(a).all() and _rel(a, b) < 1e-2, (tiles, name, _rel(a, b))
    finally:
        indexer_kl_backward.KL_BWD_V2_TILES.update(saved)
