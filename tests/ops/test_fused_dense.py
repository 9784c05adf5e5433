"""The fused dense attention (dsa_dist/ops/fused_dense.py) against the float64 reference dense attention.

CPU: the whole wrapper (query runs → kernel calls, layouts, GQA, lse, autograd) runs on PyTorch's CPU flash
kernel; the run/segment planning is checked against the positions-based causal mask; dispatch and input errors.
GPU (``-m gpu``): the CUDA kernels (flash, memory-efficient) on the model's shapes with CP-style query runs,
fresh inputs (seed logged), rule of the kernel tests: error vs float64 ≤ 2× that of plain bf16 PyTorch (+ slack).
"""

from __future__ import annotations

import logging

import pytest
import torch

from dsa_dist.ops import dispatch
from dsa_dist.ops import fused_dense as fd
from dsa_dist.ops.dense_attention import dense_attention as reference
from dsa_dist.ops.position_blocks import (
    blocks_from_positions,
    check_blocks,
    merge_adjacent,
    positions_from_blocks,
)
from dsa_dist.parallel.groups import ParallelDims
from dsa_dist.parallel.sharding import zigzag_blocks, zigzag_positions


def _inputs(b, lq, lk, h, hkv, d, dv, dtype, device="cpu", gen=None):
    mk = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)  # noqa: E731
    return mk(b, lq, h, d), mk(b, lk, hkv, d), mk(b, lk, hkv, dv), mk(b, lq, h, dv)


def _grads(fn, q, k, v, grad, dtype, **kw):
    """Forward + backward of ``fn`` on leaves cast to ``dtype``: out, lse, dq, dk, dv."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves, **kw)
    (out * grad.to(out.dtype)).sum().backward()
    return (out, lse, *(t.grad for t in leaves))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- planning
def test_blocks_helpers():
    assert blocks_from_positions([3, 4, 5, 9, 10, 2]) == ((3, 3), (9, 2), (2, 1))
    assert merge_adjacent([(0, 4), (4, 2), (8, 1)]) == ((0, 6), (8, 1))
    assert positions_from_blocks(((5, 2), (1, 3))).tolist() == [5, 6, 1, 2, 3]
    assert check_blocks("q_blocks", [[0, 2], (2, 3)], 5) == ((0, 5),)


@pytest.mark.parametrize("bad, msg", [((), "non-empty"), (((0, 0),), r"q_blocks\[0\]"), (((-1, 3),), "start >= 0"),
                                      (((0, 2),), "covers 2 queries"), (((0, 1.5),), r"q_blocks\[0\]")])
def test_check_blocks_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        check_blocks("q_blocks", bad, 3)


def _mask_from_segments(segments, lq, lk):
    mask = torch.zeros(lq, lk, dtype=torch.bool)
    for s in segments:
        for i in range(s.length):
            last = s.key_end - s.length + i if s.causal else s.key_end - 1
            mask[s.row + i, : last + 1] = True
    return mask


@pytest.mark.parametrize("blocks, lk", [(((0, 16),), 16), (((4, 4), (24, 4)), 32), (((0, 8),), 32),
                                        (((10, 12),), 16), (((20, 3), (2, 5)), 16), (((0, 1),), 1)])
def test_segments_reproduce_the_causal_mask(blocks, lk):
    """The kernel calls see exactly the keys the positions rule allows (k_pos <= q_pos), each row once."""
    lq = sum(n for _, n in blocks)
    segs = fd.plan_segments(blocks, lk)
    assert sorted(r for s in segs for r in range(s.row, s.row + s.length)) == list(range(lq))
    assert all(s.length <= s.key_end for s in segs if s.causal)  # bottom-right needs Lq <= Lk
    q_pos = positions_from_blocks(blocks)
    expected = torch.arange(lk)[None, :] <= q_pos[:, None]
    assert torch.equal(_mask_from_segments(segs, lq, lk), expected)


def test_plan_needs_a_key():
    with pytest.raises(ValueError, match="at least one key"):
        fd.plan_segments(((0, 4),), 0)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_blocks_are_the_zigzag_positions(cp):
    for rank in range(cp):
        blocks = zigzag_blocks(48, cp, rank)
        assert positions_from_blocks(blocks).tolist() == zigzag_positions(48, cp, rank).tolist()
        dims = ParallelDims(cp=cp, cp_rank=rank)
        assert dims.local_blocks(48 // cp) == blocks


def test_select_kernel():
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert fd.select_kernel(cuda, bf16, 128, 128) == "flash"
    assert fd.select_kernel(cuda, torch.float16, 256, 256) == "flash"
    assert fd.select_kernel(cuda, bf16, 288, 256) == "efficient"  # small preset's absorbed MLA
    assert fd.select_kernel(cuda, bf16, 576, 512) == "efficient"  # V3.2
    assert fd.select_kernel(cuda, torch.float32, 64, 64) == "efficient"
    assert fd.select_kernel(cuda, bf16, 60, 60) == "efficient"  # flash wants a multiple of 8
    assert fd.select_kernel(torch.device("cpu"), bf16, 64, 64) == "cpu"


# ---------------------------------------------------------------------------------------------- CPU numerics
CPU_CASES = {  # name -> (B, Lk, H, Hkv, d_qk, d_v, q_blocks)
    "mha_full": (2, 40, 4, 4, 16, 16, ((0, 40),)),
    "gqa_cp_runs": (1, 48, 4, 2, 16, 16, ((6, 6), (36, 6))),
    "mla_absorbed_cp_tail": (1, 48, 4, 1, 24, 16, ((24, 24),)),
    "past_the_keys": (2, 20, 2, 1, 8, 12, ((12, 16),)),
}


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_cpu_fused_matches_float64_reference(name):
    b, lk, h, hkv, d, dv, blocks = CPU_CASES[name]
    lq = sum(n for _, n in blocks)
    q, k, v, grad = _inputs(b, lq, lk, h, hkv, d, dv, torch.float32)
    got = _grads(fd.dense_attention, q, k, v, grad, torch.float32, softmax_scale=0.3, q_blocks=blocks)
    ref = _grads(reference, q, k, v, grad, torch.float64, softmax_scale=0.3, q_blocks=blocks)
    assert got[1].dtype == torch.float32 and got[1].shape == (b, lq, h)
    for key, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert _rel(a, r) < 1e-5, (name, key, _rel(a, r))


def test_cpu_positions_tensor_path_and_fallback(caplog):
    """Positions as tensors: read on the host → runs (same result); keys not at arange → the reference, logged."""
    q, k, v, _ = _inputs(1, 12, 30, 2, 2, 8, 8, torch.float32)
    qp = torch.cat([torch.arange(3, 9), torch.arange(20, 26)])
    out, lse = fd.dense_attention(q, k, v, q_positions=qp, k_positions=torch.arange(30))
    r_out, r_lse = reference(q, k, v, q_positions=qp)
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-5)
    kp = torch.arange(30).flip(0)
    fd._warned.clear()
    with caplog.at_level(logging.WARNING, logger="dsa_dist.ops.fused_dense"):
        out, lse = fd.dense_attention(q, k, v, q_positions=qp, k_positions=kp)
    assert "running the PyTorch reference" in caplog.text
    r_out, r_lse = reference(q, k, v, q_positions=qp, k_positions=kp)
    assert torch.equal(out, r_out) and torch.equal(lse, r_lse)


def test_errors_name_the_argument():
    q, k, v, _ = _inputs(1, 8, 8, 2, 1, 8, 8, torch.float32)
    for fn in (fd.dense_attention, reference):
        with pytest.raises(ValueError, match="q_blocks replaces q_positions"):
            fn(q, k, v, q_blocks=((0, 8),), q_positions=torch.arange(8))
        with pytest.raises(ValueError, match="covers 4 queries"):
            fn(q, k, v, q_blocks=((0, 4),))
    with pytest.raises(TypeError, match="share one dtype"):
        fd.dense_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="at least one key"):
        fd.dense_attention(q, k[:, :0], v[:, :0])
    out, lse = fd.dense_attention(q[:, :0], k, v)
    assert out.shape == (1, 0, 2, 8) and lse.shape == (1, 0, 2)


def test_attend_checks_position_blocks():
    from dsa_dist.model.dsa_core import attend

    q, k, v, _ = _inputs(1, 8, 16, 2, 1, 8, 8, torch.float32)
    pos = torch.cat([torch.arange(0, 4), torch.arange(12, 16)])
    out, lse = attend(q, k, v, softmax_scale=0.3, positions=pos, position_blocks=((0, 4), (12, 4)))
    r_out, r_lse = reference(q, k, v, 0.3, q_positions=pos)
    assert torch.equal(out, r_out) and torch.equal(lse, r_lse)  # CPU: dispatch runs the reference
    with pytest.raises(ValueError, match="do not describe positions"):
        attend(q, k, v, softmax_scale=0.3, positions=pos, position_blocks=((0, 4), (8, 4)))
    with pytest.raises(ValueError, match="cover 6 positions"):
        attend(q, k, v, softmax_scale=0.3, positions=pos, position_blocks=((0, 6),))


def test_q_blocks_path_asks_no_host_sync():
    """With q_blocks the wrapper (planning, slicing, kernel calls, backward) reads nothing back from the device;
    positions given as tensors are read on the host, as documented."""
    from tests._host_sync import HostSyncRecorder

    q, k, v, grad = _inputs(1, 8, 24, 2, 1, 8, 8, torch.float32)
    q.requires_grad_()
    with HostSyncRecorder() as rec:
        out, _ = fd.dense_attention(q, k, v, q_blocks=((2, 4), (16, 4)))
        (out * grad).sum().backward()
    assert rec.calls == [], rec.calls
    with HostSyncRecorder() as rec:
        fd.dense_attention(q, k, v, q_positions=positions_from_blocks(((2, 4), (16, 4))))
    assert any("tolist" in c for c in rec.calls), rec.calls


# ---------------------------------------------------------------------------------------------- dispatch
def test_dispatch_rule(monkeypatch):
    monkeypatch.delenv("DSA_BACKEND", raising=False)
    assert dispatch.resolve("dense_attention", "cpu") is reference
    assert dispatch.resolve("dense_attention", "cuda") is fd.dense_attention
    monkeypatch.setenv("DSA_BACKEND", "reference")
    assert dispatch.resolve("dense_attention", "cuda") is reference
    monkeypatch.setenv("DSA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="dense_attention got tensors on cpu"):
        dispatch.resolve("dense_attention", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve("dense_attention", "cpu") is fd.dense_attention


def test_float64_runs_the_reference():
    q, k, v, _ = _inputs(1, 6, 6, 2, 2, 4, 4, torch.float64)
    out, lse = fd.dense_attention(q, k, v)
    r_out, r_lse = reference(q, k, v)
    assert torch.equal(out, r_out) and torch.equal(lse, r_lse) and lse.dtype == torch.float64


# ---------------------------------------------------------------------------------------------- GPU
GPU_CASES = {  # name -> (B, Lk, H, Hkv, d_qk, d_v, q_blocks, expected kernel, EFFICIENT_KV_EXPAND)
    "small_mla_absorbed": (2, 1024, 16, 1, 288, 256, ((0, 1024),), "efficient", "view"),
    "small_mla_cp2_rank0": (1, 2048, 16, 1, 288, 256, ((0, 512), (1536, 512)), "efficient", "view"),
    # The same with materialised K/V heads: if only the "view" cases fail, set EFFICIENT_KV_EXPAND = "copy".
    "small_mla_cp2_rank0_copy": (1, 2048, 16, 1, 288, 256, ((0, 512), (1536, 512)), "efficient", "copy"),
    "v32_mla_576_512_cp": (1, 1024, 16, 1, 576, 512, ((128, 128), (768, 128)), "efficient", "view"),
    "gqa_d64_cp": (1, 2048, 16, 4, 64, 64, ((256, 256), (1536, 256)), "flash", "view"),
    "gqa_d96_fp32_efficient": (1, 512, 8, 2, 96, 96, ((128, 384),), "efficient", "view"),
    "mha_d128": (2, 1024, 16, 16, 128, 128, ((0, 1024),), "flash", "view"),
    "mha_d128_cp_tail": (1, 1536, 16, 16, 128, 128, ((1024, 512),), "flash", "view"),
}


def _naive_bf16(q, k, v, *, softmax_scale, q_blocks):
    """Plain PyTorch attention computed in bf16 (the accuracy baseline of the 2× rule)."""
    h, hkv = q.shape[2], k.shape[2]
    kk, vv = (x.repeat_interleave(h // hkv, dim=2) for x in (k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, kk) * softmax_scale
    visible = torch.arange(k.shape[1], device=q.device)[None, :] <= positions_from_blocks(q_blocks, q.device)[:, None]
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), vv)
    return out, lse.transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_fused_matches_reference(name: str, gpu_seed: int, monkeypatch) -> None:
    b, lk, h, hkv, d, dv, blocks, kernel, expand = GPU_CASES[name]
    monkeypatch.setattr(fd, "EFFICIENT_KV_EXPAND", expand)
    dtype = torch.float32 if "fp32" in name else torch.bfloat16
    lq = sum(n for _, n in blocks)
    assert fd.select_kernel(torch.device("cuda"), dtype, d, dv) == kernel
    gen = torch.Generator(device="cuda").manual_seed(gpu_seed)
    q, k, v, grad = _inputs(b, lq, lk, h, hkv, d, dv, dtype, "cuda", gen)
    kw = {"softmax_scale": d**-0.5, "q_blocks": blocks}
    assert dispatch.resolve("dense_attention", q.device) is fd.dense_attention
    got = _grads(dispatch.dense_attention, q, k, v, grad, dtype, **kw)
    ref = _grads(reference, q, k, v, grad, torch.float64, **kw)
    naive = _grads(_naive_bf16, q, k, v, grad, torch.bfloat16, **kw)
    assert got[0].dtype == dtype and got[0].shape == (b, lq, h, dv), got[0].shape
    assert got[1].dtype == torch.float32 and got[1].shape == (b, lq, h), (got[1].dtype, got[1].shape)
    failures = []
    for key, a, r, n in zip(("out", "lse", "dq", "dk", "dv"), got, ref, naive, strict=True):
        assert torch.isfinite(a).all(), f"{name}: {key} ({kernel}) has non-finite values"
        if key == "lse":  # natural-log lse of the scaled logits: absolute error
            err, base = (a.double() - r).abs().max().item(), (n.double() - r).abs().max().item()
            ok = err <= 2 * base + 1e-2
        else:
            err, base = _rel(a, r), _rel(n, r)
            ok = err <= 2 * base + 1e-3
        if not ok:
            failures.append(f"{key}: fused {err:.3g} vs plain bf16 {base:.3g}")
    assert not failures, f"{name} ({kernel} kernel): " + "; ".join(failures)


@pytest.mark.gpu
def test_gpu_fused_asks_no_host_sync(gpu_seed: int) -> None:
    """With q_blocks the fused path (forward + backward) never synchronises with the host."""
    q, k, v, grad = _inputs(1, 512, 1024, 16, 1, 288, 256, torch.bfloat16, "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = fd.dense_attention(q, k, v, 0.06, q_blocks=((0, 256), (768, 256)))
        (out * grad).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_mla_value_view_of_the_latent(gpu_seed: int) -> None:
    """MLA as attend() runs it: v = k[..., :d_v] (one latent, gradients of both uses summed into dk)."""
    gen = torch.Generator(device="cuda").manual_seed(gpu_seed)
    q, k, _, grad = _inputs(1, 512, 1536, 16, 1, 288, 256, torch.bfloat16, "cuda", gen)
    blocks = ((256, 256), (1280, 256))

    def run(fn, dtype):
        ql, kl = (t.detach().to(dtype).requires_grad_() for t in (q, k))
        out, lse = fn(ql, kl, kl[..., :256], softmax_scale=288**-0.5, q_blocks=blocks)
        (out * grad.to(dtype)).sum().backward()
        return out, lse, ql.grad, kl.grad

    got, ref = run(dispatch.dense_attention, torch.bfloat16), run(reference, torch.float64)
    naive = run(_naive_bf16, torch.bfloat16)
    for key, a, r, n in zip(("out", "lse", "dq", "dk"), got, ref, naive, strict=True):
        if key == "lse":
            err, base = (a.double() - r).abs().max().item(), (n.double() - r).abs().max().item()
            assert err <= 2 * base + 1e-2, f"lse: fused {err:.3g} vs plain bf16 {base:.3g}"
        else:
            err, base = _rel(a, r), _rel(n, r)
            assert err <= 2 * base + 1e-3, f"{key}: fused {err:.3g} vs plain bf16 {base:.3g}"
