"""DSA attention on one rank: dense mode = standard causal attention (float64, independent math); sparse with
k = L = dense (outputs, indexer KL and every gradient); the KL reaches only the indexer; tracker modes; recall."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsa_dist.model.builder import build_model, get_indexer_loss_tracker
from dsa_dist.model.config import preset
from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.model.specs import dsa_attention_spec
from tests._dist import single_rank_parallel


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    with single_rank_parallel():
        yield


def _attention(name, init_std=0.3, **overrides):
    from megatron.core.transformer.spec_utils import build_module

    cfg = preset(name, init_std=init_std, **overrides)
    tracker = IndexerLossTracker()
    torch.manual_seed(0)
    attn = build_module(dsa_attention_spec(cfg, tracker), config=cfg.to_transformer_config(None), layer_number=1)
    return cfg, attn.double(), tracker


def _rope(x, rope_dim, base):
    """Independent rotate-half rope over positions arange(L) on x [B, L, ..., D] (first rope_dim dims)."""
    pos = torch.arange(x.shape[1], dtype=torch.float64)
    inv = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    ang = pos[:, None] * inv[None]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 3) + [rope_dim // 2]
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    a, b = x[..., : rope_dim // 2], x[..., rope_dim // 2: rope_dim]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, x[..., rope_dim:]], -1)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _naive_mla(attn, cfg, x):
    """Non-absorbed MLA (per-head K/V up-projected) + causal SDPA, float64: x [s, b, h] -> [s, b, h]."""
    m, heads = cfg.mla, cfg.num_heads
    xb = x.transpose(0, 1)
    c_q = _rms(xb @ attn.linear_q_down.weight.T, attn.q_norm.weight, cfg.norm_eps)
    q = (c_q @ attn.linear_q_up.weight.T).unflatten(-1, (heads, m.qk_nope_dim + m.qk_rope_dim))
    kv = xb @ attn.linear_kv_down.weight.T
    c_kv = _rms(kv[..., : m.kv_lora_rank], attn.kv_norm.weight, cfg.norm_eps)
    k_rope = _rope(kv[..., m.kv_lora_rank:][:, :, None], m.qk_rope_dim, cfg.rope_base)
    up = (c_kv @ attn.linear_kv_up.weight.T).unflatten(-1, (heads, m.qk_nope_dim + m.v_head_dim))
    k_nope, v = up.split([m.qk_nope_dim, m.v_head_dim], -1)
    q = torch.cat([q[..., : m.qk_nope_dim], _rope(q[..., m.qk_nope_dim:], m.qk_rope_dim, cfg.rope_base)], -1)
    k = torch.cat([k_nope, k_rope.expand(-1, -1, heads, -1)], -1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       scale=(m.qk_nope_dim + m.qk_rope_dim) ** -0.5)
    o = o.transpose(1, 2).flatten(2)
    return (o @ attn.linear_proj.weight.T).transpose(0, 1)


def _naive_gqa(attn, cfg, x):
    g, heads = cfg.gqa, cfg.num_heads
    grp = heads // g.num_kv_heads
    xb = x.transpose(0, 1)
    qkv = (xb @ attn.linear_qkv.weight.T).unflatten(-1, (g.num_kv_heads, grp + 2, g.head_dim))
    q = _rope(qkv[..., :grp, :].flatten(2, 3), g.head_dim, cfg.rope_base)
    k = _rope(qkv[..., grp, :], g.head_dim, cfg.rope_base).repeat_interleave(grp, 2)
    v = qkv[..., grp + 1, :].repeat_interleave(grp, 2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       scale=g.head_dim ** -0.5)
    return (o.transpose(1, 2).flatten(2) @ attn.linear_proj.weight.T).transpose(0, 1)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_dense_equals_standard_causal_attention(name):
    cfg, attn, _ = _attention(name)
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, dtype=torch.float64)
    out, bias = attn(x, None)
    assert bias is None and out.shape == x.shape
    ref = (_naive_mla if name == "tiny" else _naive_gqa)(attn, cfg, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # The attention is far from uniform at this init, so the comparison is not vacuous.
    assert out.std() > 0.1


def _run(attn, tracker, x, grad):
    attn.zero_grad(set_to_none=True)
    tracker.reset()
    out, _ = attn(x, None)
    (out * grad).sum().backward(retain_graph=True)
    lm_grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
    attn.zero_grad(set_to_none=True)
    tracker.total().backward()
    kl_grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
    return out.detach(), tracker.values(), lm_grads, kl_grads


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_sparse_with_k_equal_L_equals_dense(name):
    cfg, attn, tracker = _attention(name, indexer={"topk": 64})
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, dtype=torch.float64)
    grad = torch.randn_like(x)
    dense = _run(attn, tracker, x, grad)
    attn.dsa.dsa_mode = "sparse"
    sparse = _run(attn, tracker, x, grad)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-10, atol=1e-10)
    assert dense[1][1] > 1e-3  # a real KL, not ~0
    assert sparse[1][1] == pytest.approx(dense[1][1], rel=1e-8)
    for i in (2, 3):
        assert sparse[i].keys() == dense[i].keys()
        for n in dense[i]:
            torch.testing.assert_close(sparse[i][n], dense[i][n], rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_indexer_loss_reaches_only_the_indexer(mode):
    cfg, attn, tracker = _attention("tiny", dsa_mode=mode)
    x = torch.randn(cfg.seq_len, 1, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    _, _, lm_grads, kl_grads = _run(attn, tracker, x, torch.randn_like(x))
    indexer = {n for n, _ in attn.named_parameters() if n.startswith("indexer.")}
    assert set(kl_grads) == indexer and all(kl_grads[n].abs().sum() > 0 for n in indexer)
    assert not (set(lm_grads) & indexer)
    assert set(lm_grads) == {n for n, _ in attn.named_parameters()} - indexer
    # The KL does not reach the layer input either (indexer inputs are detached).
    x.grad = None
    tracker.reset()
    attn(x, None)
    tracker.total().backward()
    assert x.grad is None


def test_attach_mode_matches_collect_mode_and_recall():
    cfg, attn, tracker = _attention("tiny", dsa_mode="sparse", indexer={"topk": 8})
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, dtype=torch.float64)
    grad = torch.randn_like(x)
    coeff = 0.7
    _, values, lm_grads, kl_grads = _run(attn, tracker, x, grad)
    tracker.attach_coeff = coeff
    tracker.compute_recall = True
    attn.zero_grad(set_to_none=True)
    tracker.reset()
    out, _ = attn(x, None)
    (out * grad).sum().backward()
    with pytest.raises(RuntimeError, match="attaches the KL"):
        tracker.total()
    for n, p in attn.named_parameters():
        expected = kl_grads[n] * coeff if n.startswith("indexer.") else lm_grads[n]
        # prepare_indexer_qk keeps the indexer weights in fp32, hence fp32-level agreement for the indexer.
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-9, msg=n)
    assert tracker.values()[1] == pytest.approx(values[1], rel=1e-10)
    recall = tracker.recall()[1]
    assert 0.0 < recall < 1.0
    # With k >= L the top-k set holds every causal key: recall is exactly 1.
    cfg2, attn2, tracker2 = _attention("tiny", dsa_mode="sparse", indexer={"topk": 64})
    tracker2.compute_recall = True
    attn2(x, None)
    assert tracker2.recall()[1] == pytest.approx(1.0, abs=1e-9)


def test_attention_mask_is_rejected():
    cfg, attn, _ = _attention("tiny")
    x = torch.randn(8, 1, cfg.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention_mask=None"):
        attn(x, torch.ones(1, 1, 8, 8, dtype=torch.bool))


def test_build_model_tiny_trains_on_cpu():
    torch.manual_seed(0)
    cfg = preset("tiny", dsa_mode="sparse")
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    tracker = get_indexer_loss_tracker(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        tracker.reset()
        lm = model(tokens[:, :-1].contiguous(), None, None, labels=tokens[:, 1:].contiguous()).mean()
        loss = lm + cfg.indexer_loss_coeff * tracker.total()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(lm.item())
    assert tracker.layers == [1, 2]
    assert losses[-1] < losses[0] - 0.05
    assert math.isfinite(losses[-1])


def test_kl_only_when_training_and_asked():
    from dsa_dist.model.builder import set_dsa_mode

    cfg, attn, tracker = _attention("tiny")
    x = torch.randn(16, 1, cfg.hidden_size, dtype=torch.float64)
    attn.eval()
    attn(x, None)
    assert tracker.layers == []  # eval: no KL
    attn.train()
    tracker.compute_kl = False
    attn(x, None)
    assert tracker.layers == []
    tracker.compute_kl = True
    attn(x, None)
    assert tracker.layers == [1]
    set_dsa_mode(attn, "sparse")
    assert attn.dsa.dsa_mode == "sparse"
    with pytest.raises(ValueError, match="'dense' or 'sparse'"):
        set_dsa_mode(attn, "topk")
