"""DSA attention on one rank: dense = standard causal attention (float64, independent math); sparse with k = L =
dense (outputs, indexer KL and every gradient); the KL reaches only the indexer; runtime choices; recall."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsa_dist.model.builder import build_model, get_indexer_loss_tracker
from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.model.runtime import DENSE, SPARSE_TRAIN, WARMUP, DSARuntime
from dsa_dist.model.specs import dsa_attention_spec
from tests._dist import single_rank_parallel
from tests.model._configs import model_config


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    with single_rank_parallel():
        yield


def _attention(name, runtime, init_std=0.3, tracker=None, **overrides):
    from megatron.core.transformer.spec_utils import build_module

    cfg = model_config(name, init_std=init_std, **overrides)
    tracker = tracker if tracker is not None else IndexerLossTracker()
    torch.manual_seed(0)
    attn = build_module(dsa_attention_spec(cfg, runtime, tracker), config=cfg.to_transformer_config(None),
                        layer_number=1)
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
    cfg, attn, tracker = _attention(name, DENSE)
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, dtype=torch.float64)
    tracker.begin_forward()
    out, bias = attn(x, None)
    assert bias is None and out.shape == x.shape
    ref = (_naive_mla if name == "tiny" else _naive_gqa)(attn, cfg, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # The attention is far from uniform at this init, so the comparison is not vacuous.
    assert out.std() > 0.1


def _run(attn, tracker, x, grad):
    attn.zero_grad(set_to_none=True)
    tracker.begin_forward()
    out, _ = attn(x, None)
    (out * grad).sum().backward(retain_graph=True)
    lm_grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
    attn.zero_grad(set_to_none=True)
    tracker.total().backward()
    # The fused sparse KL's gradient passes through the attention's backward node: on the KL-only backward that
    # node gives q/k/v no gradient, which Megatron's linear layers upstream turn into all-zero weight gradients.
    kl_grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None and p.grad.any()}
    return out.detach(), tracker.values(), lm_grads, kl_grads


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_sparse_with_k_equal_L_equals_dense(name):
    cfg, dense_attn, dense_tracker = _attention(name, WARMUP, indexer={"topk": 64})
    _, sparse_attn, sparse_tracker = _attention(name, SPARSE_TRAIN, indexer={"topk": 64})
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, dtype=torch.float64)
    grad = torch.randn_like(x)
    dense = _run(dense_attn, dense_tracker, x, grad)
    sparse = _run(sparse_attn, sparse_tracker, x, grad)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-10, atol=1e-10)
    assert dense[1][1] > 1e-3  # a real KL, not ~0
    assert sparse[1][1] == pytest.approx(dense[1][1], rel=1e-8)
    for i in (2, 3):
        assert sparse[i].keys() == dense[i].keys()
        for n in dense[i]:
            torch.testing.assert_close(sparse[i][n], dense[i][n], rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("runtime", [WARMUP, SPARSE_TRAIN])
def test_indexer_loss_reaches_only_the_indexer(runtime):
    cfg, attn, tracker = _attention("tiny", runtime)
    x = torch.randn(cfg.seq_len, 1, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    _, _, lm_grads, kl_grads = _run(attn, tracker, x, torch.randn_like(x))
    indexer = {n for n, _ in attn.named_parameters() if n.startswith("indexer.")}
    assert set(kl_grads) == indexer and all(kl_grads[n].abs().sum() > 0 for n in indexer)
    assert not (set(lm_grads) & indexer)
    assert set(lm_grads) == {n for n, _ in attn.named_parameters()} - indexer
    # The KL does not reach the layer input either (indexer inputs are detached).
    x.grad = None
    tracker.begin_forward()
    attn(x, None)
    tracker.total().backward()
    assert x.grad is None or not x.grad.any()  # fused KL: zeros through the attention node (see _run)


def test_attach_mode_matches_collect_mode_and_recall():
    cfg, attn, tracker = _attention("tiny", SPARSE_TRAIN, indexer={"topk": 8})
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, dtype=torch.float64)
    grad = torch.randn_like(x)
    coeff = 0.7
    _, values, lm_grads, kl_grads = _run(attn, tracker, x, grad)
    _, attn, tracker = _attention("tiny", SPARSE_TRAIN, tracker=IndexerLossTracker(attach_coeff=coeff),
                                  indexer={"topk": 8})
    tracker.begin_forward(measure_recall=True)
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
    tracker.begin_forward()  # recall is asked per forward: the next one does not measure it
    attn(x, None)
    assert tracker.recall() == {} and list(tracker.values()) == [1]
    # With k >= L the top-k set holds every causal key: recall is exactly 1.
    _, attn2, tracker2 = _attention("tiny", SPARSE_TRAIN, indexer={"topk": 64})
    tracker2.begin_forward(measure_recall=True)
    attn2(x, None)
    assert tracker2.recall()[1] == pytest.approx(1.0, abs=1e-9)


def test_attention_mask_is_rejected():
    cfg, attn, _ = _attention("tiny", DENSE)
    x = torch.randn(8, 1, cfg.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention_mask=None"):
        attn(x, torch.ones(1, 1, 8, 8, dtype=torch.bool))


def test_build_model_tiny_trains_on_cpu():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = build_model(cfg, runtime=SPARSE_TRAIN)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    tracker = get_indexer_loss_tracker(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        tracker.begin_forward()
        lm = model(tokens[:, :-1].contiguous(), None, None, labels=tokens[:, 1:].contiguous()).mean()
        loss = lm + cfg.indexer_loss_coeff * tracker.total()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(lm.item())
    assert tracker.layers == [1, 2]
    assert losses[-1] < losses[0] - 0.05
    assert math.isfinite(losses[-1])
    with pytest.raises(ValueError, match="runtime must be"):
        build_model(cfg, runtime="sparse")


def test_kl_follows_the_runtime_not_the_module_mode():
    x = torch.randn(16, 1, 64, dtype=torch.float64)
    _, dense, tracker = _attention("tiny", DENSE)
    for training in (True, False):
        dense.train(training)
        tracker.begin_forward()
        dense(x, None)
        assert tracker.layers == [] and tracker.recall() == {}  # the dense stage computes no KL
        tracker.begin_forward(measure_recall=True)
        dense(x, None)
        assert tracker.layers == [] and 0 < tracker.recall()[1] <= 1  # recall only where asked
    _, warm, tracker = _attention("tiny", WARMUP)
    for training in (True, False):
        warm.train(training)
        tracker.begin_forward()
        warm(x, None)
        assert tracker.layers == [1] and tracker.values()[1] > 0  # eval mode computes it too
    with pytest.raises(ValueError, match="'dense' or 'sparse'"):
        DSARuntime(attention="topk")
