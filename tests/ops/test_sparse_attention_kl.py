"""The fused sparse attention + indexer KL (reference op) against the unfused path, in float64.

Unfused: ``sparse_attention`` + ``indexer_kl_loss_sparse`` (target rebuilt from q, k and the lse). Fused: the KL's
gradient arrives through the attention's backward (``kl_proxy``) and its value is written into ``kl_value``.
"""

from __future__ import annotations

import pytest
import torch

from dsa_dist.model.indexer_loss import attach_loss
from dsa_dist.ops import indexer_kl_loss_sparse, sparse_attention, sparse_attention_with_indexer_kl
from tests._inputs import random_causal_indices

SEED = 1234
COEFF = 0.37


def make_problem(b=2, L=12, h=4, hkv=1, d=24, dv=16, hi=3, di=8, topk=6, mla=True, seed=SEED,
                 dtype=torch.float64):
    """Leaves (q, kv or (k, v), q_index, k_index, weights), indices with −1 slots, an empty row and short rows."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q = rnd(b, L, h, d)
    kv = (rnd(b, L, hkv, d),) if mla else (rnd(b, L, hkv, d), rnd(b, L, hkv, dv))
    qi, ki, w = rnd(b, L, hi, di), rnd(b, L, di), rnd(b, L, hi)
    idx = random_causal_indices(b, L, L, topk, gen)  # rows t < topk-1 have t+1 keys and −1 slots
    idx[1, L // 2] = -1  # a row with no key at all
    idx[0, L - 1, 0] = -1  # a −1 among valid slots of a full row
    grad_out = rnd(b, L, h, dv)
    return (q, *kv, qi, ki, w), idx, grad_out


def _split(leaves, mla, dv):
    q, *kv, qi, ki, w = leaves
    k, v = (kv[0], kv[0][..., :dv]) if mla else kv
    return q, k, v, qi, ki, w


def unfused_loss(leaves, idx, grad_out, mla, dv, scale):
    q, k, v, qi, ki, w = _split(leaves, mla, dv)
    out, lse = sparse_attention(q, k, v, idx, scale, chunk_size=5)
    kl = indexer_kl_loss_sparse(q, k, qi, ki, w, idx, attn_lse=lse, softmax_scale=scale, chunk_size=5)
    return (out * grad_out).sum() + COEFF * kl, kl


def fused_loss(leaves, idx, grad_out, mla, dv, scale, fn=sparse_attention_with_indexer_kl, attach=False):
    q, k, v, qi, ki, w = _split(leaves, mla, dv)
    out, lse, proxy, value = fn(q, k, v, idx, scale, qi, ki, w, chunk_size=5)
    if attach:
        return (attach_loss(out, proxy, COEFF) * grad_out).sum(), value
    return (out * grad_out).sum() + COEFF * proxy, value


def grads(loss_fn, leaves, *args, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    loss, kl = loss_fn(leaves, *args, **kwargs)
    loss.backward()
    return loss.detach(), kl.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("mla", [True, False], ids=["mla_view", "gqa"])
@pytest.mark.parametrize("attach", [False, True], ids=["added", "attached"])
def test_fused_matches_unfused_float64(mla, attach):
    """Gradients of attention loss + coeff·KL w.r.t. q, kv and the indexer inputs; the logged KL value."""
    hkv, h = (1, 4) if mla else (2, 4)
    leaves, idx, grad_out = make_problem(hkv=hkv, h=h, mla=mla)
    scale = 0.3
    loss_ref, kl_ref, g_ref = grads(unfused_loss, leaves, idx, grad_out, mla, 16, scale)
    loss_f, kl_f, g_f = grads(fused_loss, leaves, idx, grad_out, mla, 16, scale, attach=attach)
    torch.testing.assert_close(kl_f, kl_ref.float())  # the value, known after the backward
    assert kl_ref > 0
    torch.testing.assert_close(loss_f, loss_ref - COEFF * kl_ref)  # the proxy adds 0 to the loss value
    names = ["q", "kv"] if mla else ["q", "k", "v"]
    for name, a, b in zip(names + ["q_index", "k_index", "weights"], g_f, g_ref):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_without_kl_gradient_skips_kl():
    """kl_proxy unused: attention gradients unchanged, indexer gets none, kl_value stays NaN."""
    leaves, idx, grad_out = make_problem()
    q, kv, qi, ki, w = (x.detach().clone().requires_grad_() for x in leaves)
    out, _, _, value = sparse_attention_with_indexer_kl(q, kv, kv[..., :16], idx, None, qi, ki, w)
    (out * grad_out).sum().backward()
    assert torch.isnan(value) and qi.grad is None and ki.grad is None and w.grad is None
    q2, kv2 = (x.detach().clone().requires_grad_() for x in leaves[:2])
    ref, _ = sparse_attention(q2, kv2, kv2[..., :16], idx)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(kv.grad, kv2.grad)


def test_fused_kl_only_gradient_and_forward_values():
    """Only the proxy in the loss: indexer grads = coeff·∂KL, none for q/kv; out and lse as the plain op."""
    leaves, idx, _ = make_problem(seed=7)
    q, kv, qi, ki, w = (x.detach().clone().requires_grad_() for x in leaves)
    out, lse, proxy, value = sparse_attention_with_indexer_kl(q, kv, kv[..., :16], idx, None, qi, ki, w)
    ref_out, ref_lse = sparse_attention(q, kv, kv[..., :16], idx)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert proxy.item() == 0.0 and torch.isnan(value)
    (COEFF * proxy).backward()
    assert q.grad is None and kv.grad is None
    qi2, ki2, w2 = (x.detach().clone().requires_grad_() for x in leaves[2:])
    kl = indexer_kl_loss_sparse(q.detach(), kv.detach(), qi2, ki2, w2, idx, attn_lse=ref_lse)
    (COEFF * kl).backward()
    torch.testing.assert_close(value, kl.detach().float())
    for a, b in ((qi.grad, qi2.grad), (ki.grad, ki2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(a, b)


def test_fused_rejects_bad_indexer_inputs():
    leaves, idx, _ = make_problem()
    q, kv, qi, ki, w = leaves
    with pytest.raises(ValueError, match="q_index must be"):
        sparse_attention_with_indexer_kl(q, kv, kv[..., :16], idx, None, qi[:, :-1], ki, w[:, :-1])
    with pytest.raises(ValueError, match="k_index must be"):
        sparse_attention_with_indexer_kl(q, kv, kv[..., :16], idx, None, qi, ki[:, :-1], w)
    with pytest.raises(ValueError, match="shared by all heads"):
        sparse_attention_with_indexer_kl(q, kv, kv[..., :16], idx[:, :, None], None, qi, ki, w)


def test_dispatch_runs_the_reference_fused_op_on_cpu():
    from dsa_dist.ops import dispatch

    assert dispatch.resolve("sparse_attention_with_indexer_kl", "cpu") is sparse_attention_with_indexer_kl
    leaves, idx, grad_out = make_problem(seed=3)
    _, kl_ref, g_ref = grads(fused_loss, leaves, idx, grad_out, True, 16, 0.3)
    _, kl_disp, g_disp = grads(fused_loss, leaves, idx, grad_out, True, 16, 0.3,
                               fn=dispatch.sparse_attention_with_indexer_kl)
    assert torch.equal(kl_ref, kl_disp) and all(torch.equal(a, b) for a, b in zip(g_ref, g_disp))


def _head_split_worker(rank: int, world_size: int, leaves, idx, grad_out):
    """This rank's heads (all rows) and indexer rows rank::world of the one-rank problem, fused op, float64."""
    import torch.distributed as dist

    q, kv, qi, ki, w = (x.detach().clone() for x in leaves)
    h = q.shape[2] // world_size
    q = q[:, :, rank * h:(rank + 1) * h].clone().requires_grad_()
    kv.requires_grad_()
    qi, w = (x[:, rank::world_size].clone().requires_grad_() for x in (qi, w))
    ki.requires_grad_()
    out, _, proxy, value = sparse_attention_with_indexer_kl(q, kv, kv[..., :16], idx, 0.3, qi, ki, w, chunk_size=5,
                                                            head_group=dist.group.WORLD)
    ((out * grad_out[:, :, rank * h:(rank + 1) * h]).sum() + COEFF * proxy).backward()
    return {"value": value, "q": q.grad, "kv": kv.grad, "qi": qi.grad, "ki": ki.grad, "w": w.grad}


def test_head_split_over_a_group_matches_one_rank():
    """Heads split over 2 gloo ranks (tensor parallelism): the all-reduced target gives each rank the KL of its
    rows rank::2 — values average, and the gradients assemble, to the one-rank ones."""
    from tests._dist import run_distributed

    leaves, idx, grad_out = make_problem(h=4, seed=11)
    _, kl_one, (g_q, g_kv, g_qi, g_ki, g_w) = grads(fused_loss, leaves, idx, grad_out, True, 16, 0.3)
    ranks = run_distributed(_head_split_worker, 2, leaves, idx, grad_out)
    torch.testing.assert_close(sum(r["value"] for r in ranks) / 2, kl_one)
    torch.testing.assert_close(torch.cat([r["q"] for r in ranks], 2), g_q)
    # The attention part of dkv is split over heads (summed by the ranks' sum), the KL gives kv nothing.
    torch.testing.assert_close(ranks[0]["kv"] + ranks[1]["kv"], g_kv)
    for name, full in (("qi", g_qi), ("w", g_w)):  # a rank's KL is a mean over half the rows: twice the weight
        for r in range(2):
            torch.testing.assert_close(ranks[r][name], 2 * full[:, r::2], msg=name)
    torch.testing.assert_close((ranks[0]["ki"] + ranks[1]["ki"]) / 2, g_ki)  # TP-averaged, as Megatron does
