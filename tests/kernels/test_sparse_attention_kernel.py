"""Triton sparse attention (kernels/sparse_attention.py) against the reference op (dsa_dist.ops).

CPU: the kernels run under Triton's interpreter, every case in one subprocess (tests/_interpret.py); each
parametrized test reports its case. References are float64 on upcast inputs.

GPU (``-m gpu``): realistic V3.2 shapes, fresh inputs (seed logged), poisoned outputs, accuracy rule of
flash-attn's tests: kernel error vs float64 ≤ 2× the error of plain PyTorch attention run in bf16 (+ slack).
"""

from __future__ import annotations

import pytest
import torch

from tests._inputs import random_causal_indices
from tests._interpret import check_interpreted, run_interpreted

# name -> (B, L, H, Hkv, d_qk, d_v, topk, dtype, v_mode, idx_mode, config)
#   v_mode: "view" = v is k[..., :d_v] (MLA absorbed), "sep" = separate tensor, "strided" = non-contiguous v
#   idx_mode: "shared" [B, L, k] / "group" [B, L, Hkv, k]
#   config: None (defaults) or (block_h, block_n, dkv block_h) forced through the launchers (several head blocks)
CPU_CASES = {
    "mla_view_fp32": (1, 64, 16, 1, 80, 64, 32, "float32", "view", "shared", None),
    "mqa_sep_bf16_upcast": (1, 64, 16, 1, 64, 32, 32, "bfloat16", "sep", "shared", None),
    "gqa_fp16_group_idx": (2, 48, 16, 4, 32, 32, 32, "float16", "strided", "group", None),
    "gqa_odd_dims_fp32": (1, 40, 12, 3, 48, 24, 32, "float32", "sep", "shared", None),
    "mla_headblocks": (1, 32, 64, 1, 80, 64, 32, "float32", "view", "shared", (16, 16, 16)),
}

# Cases rerun with the dq and dk/dv programs interleaved in one launch (kernels.sparse_attention.MIXED_BACKWARD).
MIXED_CASES = ["mla_view_fp32", "gqa_fp16_group_idx", "mla_headblocks"]

# Relative Frobenius error allowed against float64: fp32 interpreter math is ~1e-7; fp16 / bf16 outputs
# rounded once (2^-11 / 2^-8 relative) plus fp16 P in the PV dot.
CPU_TOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


def _make_case(case, gen, device="cpu"):
    b, n, h, hkv, d, dv, topk, dtype, v_mode, idx_mode, _ = case
    dt = getattr(torch, dtype)
    q = torch.randn(b, n, h, d, generator=gen, device=device).to(dt)
    k = torch.randn(b, n, hkv, d, generator=gen, device=device).to(dt)
    if v_mode == "sep":
        v = torch.randn(b, n, hkv, dv, generator=gen, device=device).to(dt)
    elif v_mode == "strided":
        v = torch.randn(b, n, hkv, 2 * dv, generator=gen, device=device).to(dt)[..., ::2]
    else:
        v = None  # view of k, built inside the graph
    if idx_mode == "group":
        idx = torch.stack([random_causal_indices(b, n, n, topk, gen, device) for _ in range(hkv)], dim=2)
    else:
        idx = random_causal_indices(b, n, n, topk, gen, device)
        idx[0, n // 2, :] = -1  # one row with no valid key: lse -inf, output 0
    grad = torch.randn(b, n, h, dv, generator=gen, device=device).to(dt)
    return q, k, v, idx, grad


def _run(fn, q, k, v, idx, grad, dv: int, dtype: torch.dtype):
    """Forward + backward of ``fn`` on leaves cast to ``dtype``; v=None means v = k[..., :dv]."""
    ql = q.detach().to(dtype).requires_grad_()
    kl = k.detach().to(dtype).requires_grad_()
    vl = None if v is None else v.detach().to(dtype).requires_grad_()
    out, lse = fn(ql, kl, kl[..., :dv] if vl is None else vl, idx)
    (out.to(dtype) * grad.to(dtype)).sum().backward()
    return {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": None if vl is None else vl.grad}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _lse_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs lse error on finite rows; inf if the −inf pattern differs."""
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin) or not torch.equal(a[~fin], b[~fin]):
        return float("inf")
    return (a[fin].double() - b[fin].double()).abs().max().item()


def _cpu_case(name: str) -> None:
    """Forward and backward of one CPU case under the interpreter against the float64 reference
    (``name+mixed``: with the backward's two passes interleaved in one launch)."""
    from dsa_dist.ops.sparse_attention import sparse_attention as reference
    from kernels import sparse_attention as ks

    name, _, variant = name.partition("+")
    ks.MIXED_BACKWARD = variant == "mixed"
    case = CPU_CASES[name]
    dv, dtype, config = case[5], getattr(torch, case[7]), case[10]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    q, k, v, idx, grad = _make_case(case, gen)

    if config is None:
        kernel_fn = ks.sparse_attention
    else:
        fwd_cfg = ks.KernelConfig(config[0], config[1], 4, 1)
        bwd_cfg = ks.BwdConfig(fwd_cfg, ks.KernelConfig(config[2], config[1], 4, 1))

        class _Forced(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q_, k_, v_, idx_):
                out, lse = ks.sparse_attention_fwd(q_, k_, v_, idx_, q_.shape[-1] ** -0.5, fwd_cfg)
                ctx.save_for_backward(q_, k_, v_, idx_, out, lse)
                return out, lse

            @staticmethod
            def backward(ctx, g, _):
                q_, k_, v_, idx_, out, lse = ctx.saved_tensors
                scale = q_.shape[-1] ** -0.5
                dq, dk, dv_ = ks.sparse_attention_bwd(q_, k_, v_, idx_, out, lse, g, scale, config=bwd_cfg)
                return dq, dk, dv_, None

        def kernel_fn(q_, k_, v_, idx_):
            return _Forced.apply(q_, k_, v_, idx_)

    got = _run(kernel_fn, q, k, v, idx, grad, dv, dtype)
    ref = _run(reference, q, k, v, idx.long(), grad, dv, torch.float64)
    assert got["out"].dtype == dtype and got["lse"].dtype == torch.float32
    if case[9] == "shared":
        assert (got["out"][0, case[1] // 2] == 0).all()  # the row with no valid key
    tol = CPU_TOL[case[7]]
    assert _lse_err(got["lse"], ref["lse"]) <= 10 * tol
    for key in ("out", "dq", "dk", "dv"):
        if ref[key] is not None:
            assert _rel(got[key], ref[key]) <= tol, (key, _rel(got[key], ref[key]))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    names = list(CPU_CASES) + [f"{name}+mixed" for name in MIXED_CASES]
    return run_interpreted(__name__, [f"_cpu_case:{name}" for name in names])


@pytest.mark.parametrize("name", list(CPU_CASES) + [f"{name}+mixed" for name in MIXED_CASES])
def test_interpreter_matches_reference(interpreted: dict, name: str) -> None:
    check_interpreted(interpreted, f"_cpu_case:{name}")


def test_rejects_bad_inputs() -> None:
    from kernels.sparse_attention import sparse_attention

    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="topk_indices"):
        sparse_attention(q, q[:, :, :1], q[:, :, :1], torch.zeros(1, 3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple"):
        sparse_attention(q, torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16), torch.zeros(1, 4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"topk_indices has batch size 2 .* but q has 1"):
        sparse_attention(q, q[:, :, :1], q[:, :, :1], torch.zeros(2, 4, 2, dtype=torch.int32))


@pytest.mark.parametrize("bad,match", [(4, r"max index 4 with L = 4"), (1 << 30, r"max index 1073741824"),
                                       (-2, r"got min -2")])
def test_rejects_indices_outside_the_keys(bad: int, match: str) -> None:
    """An index ≥ L (or < −1) would be gathered past the end of k/v: refused before any launch."""
    from kernels.sparse_attention import sparse_attention

    q = torch.randn(1, 4, 2, 16)
    idx = torch.zeros(1, 4, 2, dtype=torch.int32)
    idx[0, 3, 1] = bad
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, q[:, :, :1], q[:, :, :1], idx)


# ---------------------------------------------------------------------------------------------- GPU tests


def _naive_bf16(q, k, v, idx, scale):
    """Plain PyTorch attention over the gathered keys, every op in bf16 (the accuracy yardstick)."""
    from dsa_dist.ops.sparse_attention import gather_rows

    b, lq, h, d = q.shape
    hkv = k.shape[2]
    ks, vs = gather_rows(k, idx), gather_rows(v, idx)  # [B, L, k, Hkv, d]
    qg = q.reshape(b, lq, hkv, h // hkv, d)
    logits = torch.einsum("bcgjd,bckgd->bcgjk", qg, ks) * scale
    valid = (idx >= 0)[:, :, None, None, :]
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(logits.float(), -1).to(torch.bfloat16).float()
    probs = torch.softmax(logits, -1).nan_to_num(0.0)  # a row with no valid key: 0, as the op defines it
    out = torch.einsum("bcgjk,bckgd->bcgjd", probs, vs)
    return out.reshape(b, lq, h, -1), lse.reshape(b, lq, h)


def _chunked_grads(fn, q, k, v, idx, grad, dv, dtype, chunk):
    """out, lse, dq, d(k or latent), dv of ``fn`` computed over query chunks (bounded memory)."""
    kl = k.detach().to(dtype).requires_grad_()
    vl = None if v is None else v.detach().to(dtype).requires_grad_()
    outs, lses, dqs = [], [], []
    for s in range(0, q.shape[1], chunk):
        qc = q[:, s : s + chunk].detach().to(dtype).requires_grad_()
        out, lse = fn(qc, kl, kl[..., :dv] if vl is None else vl, idx[:, s : s + chunk])
        (out * grad[:, s : s + chunk].to(dtype)).sum().backward()
        outs.append(out.detach())
        lses.append(lse.detach())
        dqs.append(qc.grad)
    return torch.cat(outs, 1), torch.cat(lses, 1), torch.cat(dqs, 1), kl.grad, None if vl is None else vl.grad


GPU_CASES = {
    # V3.2 MLA absorbed: 128 heads, latent 512 + rope 64, v = latent[..., :512]
    "mla_576_512": (1, 4096, 128, 1, 576, 512, 2048, "bfloat16", "view", "shared", None),
    # MQA with separate v, 192/128 (split 128 + 64)
    "mqa_192_128": (1, 2048, 128, 1, 192, 128, 2048, "bfloat16", "sep", "shared", None),
    # GQA: 8 KV groups of 8 heads (padded to 16 rows)
    "gqa_128": (1, 4096, 64, 8, 128, 128, 2048, "bfloat16", "sep", "shared", None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("mixed", [False, True], ids=["two_launches", "mixed"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_matches_reference(name: str, mixed: bool, gpu_seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsa_dist.ops.sparse_attention import sparse_attention as reference
    from kernels import sparse_attention as ks

    monkeypatch.setattr(ks, "MIXED_BACKWARD", mixed)

    case = GPU_CASES[name]
    dv = case[5]
    gen = torch.Generator(device="cuda").manual_seed(gpu_seed)  # fresh inputs, seed logged
    q, k, v, idx, grad = _make_case(case, gen, device="cuda")
    scale = case[4] ** -0.5
    v_in = k[..., :dv] if v is None else v

    # Poisoned outputs: every element must be written by the kernels.
    out = torch.full((*q.shape[:3], dv), float("nan"), device="cuda", dtype=q.dtype)
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    dq = torch.full_like(q, float("nan"))
    ks.sparse_attention_fwd(q, k, v_in, idx, scale, out=out, lse=lse)
    _, dk, dv_k = ks.sparse_attention_bwd(q, k, v_in, idx, out, lse, grad, scale, dq=dq)
    assert not out.isnan().any() and not lse.isnan().any() and not dq.isnan().any()
    if v is None:
        assert dv_k is None  # folded into dk
    # The autograd path gives the same numbers as the raw launchers.
    ao, al, adq, adk, adv = _chunked_grads(ks.sparse_attention, q, k, v, idx, grad, dv, q.dtype, q.shape[1])
    torch.testing.assert_close(ao, out, rtol=0, atol=0)
    torch.testing.assert_close(adq, dq, rtol=0, atol=0)

    ref = _chunked_grads(reference, q, k, v, idx.long(), grad, dv, torch.float64, 256)
    naive = _chunked_grads(lambda *a: _naive_bf16(*a, scale), q, k, v, idx, grad, dv, torch.bfloat16, 512)
    got = (out, lse, dq, adk, adv)
    names = ("out", "lse", "dq", "dk", "dv")
    for i, key in enumerate(names):
        if ref[i] is None:
            continue
        if key == "lse":
            err, base = _lse_err(got[i], ref[i]), _lse_err(naive[i], ref[i])
            assert err <= 2 * base + 1e-2, (key, err, base)
        else:
            err, base = _rel(got[i], ref[i]), _rel(naive[i], ref[i])
            assert err <= 2 * base + 1e-3, (key, err, base)


@pytest.mark.gpu
def test_gpu_fp32_within_plain_fp32_torch(gpu_seed: int) -> None:
    """fp32 inputs: the kernels' error stays within 2× plain fp32 PyTorch's. Triton's default TF32 dots would
    be ~1e-3 relative (three orders above torch's fp32 matmul); the kernels use 3xTF32 for fp32 operands."""
    from dsa_dist.ops.sparse_attention import sparse_attention as reference
    from kernels import sparse_attention as ks

    case = (1, 1024, 16, 2, 96, 64, 256, "float32", "sep", "shared", None)
    gen = torch.Generator(device="cuda").manual_seed(gpu_seed)
    q, k, v, idx, grad = _make_case(case, gen, device="cuda")
    scale = case[4] ** -0.5
    got = _chunked_grads(ks.sparse_attention, q, k, v, idx, grad, 64, torch.float32, 1024)
    ref = _chunked_grads(reference, q, k, v, idx.long(), grad, 64, torch.float64, 256)
    naive = _chunked_grads(lambda *a: _naive_bf16(*a, scale), q, k, v, idx, grad, 64, torch.float32, 512)
    for i, key in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
        err, base = _rel(got[i], ref[i]), _rel(naive[i], ref[i])
        assert err <= 2 * base + 1e-6, (key, err, base)
    assert _lse_err(got[1], ref[1]) <= 1e-5
