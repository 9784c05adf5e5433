"""The sparse stage with the fused KL (DSARuntime.fused_sparse_kl, default) against the separate KL op, float64.

Same model, same input: the gradients of LM-like loss + coeff·KL, the KL value per layer (known after the
backward) and the value of ``tracker.total()`` once the backward has run must match the unfused path.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.model.runtime import DSARuntime
from dsa_dist.model.specs import dsa_attention_spec
from tests._dist import single_rank_parallel
from tests.model._configs import model_config

COEFF = 0.3


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    with single_rank_parallel():
        yield


def _attention(name, fused, tracker):
    from megatron.core.transformer.spec_utils import build_module

    cfg = model_config(name, init_std=0.3, indexer={"topk": 8})
    torch.manual_seed(0)
    runtime = DSARuntime(attention="sparse", indexer_kl=True, fused_sparse_kl=fused)
    attn = build_module(dsa_attention_spec(cfg, runtime, tracker), config=cfg.to_transformer_config(None),
                        layer_number=1)
    return cfg, attn.double()


def _step(name, fused, x, grad, attach):
    tracker = IndexerLossTracker(attach_coeff=COEFF if attach else None)
    _, attn = _attention(name, fused, tracker)
    tracker.begin_forward()
    out, _ = attn(x, None)
    loss = (out * grad).sum()
    total = None
    if not attach:
        total = tracker.total()
        loss = loss + COEFF * total
    loss.backward()
    grads = {n: p.grad for n, p in attn.named_parameters()}
    return grads, tracker.values(), None if total is None else total.item(), tracker.logged_total().item()


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("attach", [False, True], ids=["added", "attached"])
def test_fused_sparse_kl_matches_separate_op(name, attach):
    cfg = model_config(name)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, dtype=torch.float64, generator=gen)
    grad = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    ref_grads, ref_values, ref_total, ref_logged = _step(name, False, x, grad, attach)
    grads, values, total, logged = _step(name, True, x, grad, attach)
    assert ref_values[1] > 1e-3
    assert values[1] == pytest.approx(ref_values[1], rel=1e-6)  # fp32 KL value from the backward
    assert logged == pytest.approx(ref_logged, rel=1e-6)
    if not attach:  # the tensor total() returned holds the KL once the backward has run
        assert total == pytest.approx(ref_total, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert g is not None and g.abs().sum() > 0, n
        # The indexer's weights are fp32 inside the KL (prepare_indexer_qk), hence fp32-level agreement there.
        torch.testing.assert_close(grads[n], g, rtol=1e-6, atol=1e-9, msg=n)


def test_fused_sparse_kl_value_is_set_by_the_backward_and_eval_uses_the_separate_op():
    tracker = IndexerLossTracker()
    cfg, attn = _attention("tiny", True, tracker)
    x = torch.randn(cfg.seq_len, 1, cfg.hidden_size, dtype=torch.float64)
    tracker.begin_forward()
    out, _ = attn(x, None)
    total = tracker.total()
    assert total.item() == 0.0 and torch.isnan(torch.tensor(tracker.values()[1]))  # before the backward
    (out.sum() + total).backward()
    after = tracker.values()[1]
    assert after > 1e-3 and total.item() == pytest.approx(after, rel=1e-12)
    with torch.no_grad():  # forward-only (evaluation): the KL value is computed in the forward
        tracker.begin_forward()
        attn(x, None)
    assert tracker.values()[1] == pytest.approx(after, rel=1e-6)
    # A no-grad forward of an input that needs grad (reentrant recompute's first pass) leaves the KL to the
    # recomputed pass: no separate KL now.
    with torch.no_grad():
        tracker.begin_forward()
        attn(x.clone().requires_grad_(), None)
    assert math.isnan(tracker.values()[1])


def test_runtime_rejects_non_bool_fused_flag():
    with pytest.raises(ValueError, match="fused_sparse_kl must be a bool"):
        DSARuntime(fused_sparse_kl="yes")
