"""Sparse attention against dense causal attention (torch SDPA) and float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from dsa_dist.ops import dense_attention, sparse_attention
from tests._inputs import all_causal_indices


def _sdpa(q, k, v):
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    # SDPA needs equal qk/v head dims only for some backends; the math backend handles d_qk ≠ d_v.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    "h,hkv,dqk,dv",
    [(8, 1, 36, 32), (4, 4, 16, 16), (6, 2, 16, 8)],  # MLA-like MQA (d_qk ≠ d_v), MHA, GQA
)
def test_k_ge_L_equals_dense_sdpa_with_grads(h, hkv, dqk, dv):
    b, L = 2, 24
    q = torch.randn(b, L, h, dqk, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, L, hkv, dqk, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, L, hkv, dv, dtype=torch.float64, requires_grad=True)
    idx = all_causal_indices(b, L, L + 5)  # k > L: padded tail
    out, lse = sparse_attention(q, k, v, idx, chunk_size=7)
    ref = _sdpa(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    # lse equals the dense log-sum-exp of the scaled logits
    _, dense_lse = dense_attention(q, k, v)
    torch.testing.assert_close(lse, dense_lse)


def test_permuted_index_order_and_mla_value_view():
    """Order of the selected keys does not matter; V may be a view of the K latent (MLA absorbed mode)."""
    b, L, h = 1, 16, 4
    latent = torch.randn(b, L, 1, 20, dtype=torch.float64)
    q = torch.randn(b, L, h, 20, dtype=torch.float64)
    idx = all_causal_indices(b, L, L)
    perm = torch.argsort(torch.rand(b, L, L), dim=-1)
    _, dense_lse = dense_attention(q, latent, latent[..., :16])
    for order in (idx, idx.gather(-1, perm)):
        out, lse = sparse_attention(q, latent, latent[..., :16], order)
        torch.testing.assert_close(out, _sdpa(q, latent, latent[..., :16]))
        torch.testing.assert_close(lse, dense_lse)


def test_subset_matches_masked_dense():
    b, L, h, d, topk = 1, 20, 4, 8, 5
    q, k, v = (torch.randn(b, L, n, d, dtype=torch.float64) for n in (h, 1, 1))
    idx = torch.stack([torch.randperm(t + 1)[:topk].sort().values for t in range(topk - 1, L)])  # rows ≥ k
    idx = torch.cat([all_causal_indices(1, topk - 1, topk)[0].long(), idx]).unsqueeze(0)
    out, _ = sparse_attention(q, k, v, idx.int())
    mask = torch.zeros(L, L, dtype=torch.bool)
    for t in range(L):
        mask[t, idx[0, t][idx[0, t] >= 0]] = True
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.expand(-1, -1, h, -1).transpose(1, 2),
                                         v.expand(-1, -1, h, -1).transpose(1, 2), attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_per_group_indices_for_gqa():
    b, L, h, hkv, d = 1, 12, 4, 2, 8
    q = torch.randn(b, L, h, d, dtype=torch.float64)
    k = torch.randn(b, L, hkv, d, dtype=torch.float64)
    v = torch.randn(b, L, hkv, d, dtype=torch.float64)
    shared = all_causal_indices(b, L, 4)
    other = torch.where(shared >= 0, torch.clamp(torch.arange(L)[None, :, None] - shared, min=0), -1).int()
    per_group = torch.stack([shared, other], dim=2)  # [B, L, Hkv, k]
    out, _ = sparse_attention(q, k, v, per_group)
    for g, sets in enumerate((shared, other)):  # group g (heads 2g, 2g+1) against masked dense attention
        mask = torch.zeros(L, L, dtype=torch.bool)
        for t in range(L):
            mask[t, sets[0, t][sets[0, t] >= 0].long()] = True
        heads = slice(2 * g, 2 * g + 2)
        ref = F.scaled_dot_product_attention(q[:, :, heads].transpose(1, 2),
                                             k[:, :, g:g + 1].expand(-1, -1, 2, -1).transpose(1, 2),
                                             v[:, :, g:g + 1].expand(-1, -1, 2, -1).transpose(1, 2), attn_mask=mask)
        torch.testing.assert_close(out[:, :, heads], ref.transpose(1, 2))


def test_gradcheck_float64():
    b, L, h, d, topk = 1, 6, 2, 4, 3
    q = torch.randn(b, L, h, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, L, 1, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, L, 1, 3, dtype=torch.float64, requires_grad=True)
    idx = all_causal_indices(b, L, L)[..., :topk].contiguous()
    assert torch.autograd.gradcheck(lambda *x: sparse_attention(*x, idx)[0], (q, k, v))


def test_row_without_valid_key_is_zero_not_nan():
    q, k, v = (torch.randn(1, 3, n, 4, dtype=torch.float64, requires_grad=True) for n in (2, 1, 1))
    idx = torch.tensor([[[-1, -1], [0, 1], [2, -1]]], dtype=torch.int32)
    out, lse = sparse_attention(q, k, v, idx)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0])) and torch.isneginf(lse[0, 0]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
