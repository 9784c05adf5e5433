"""The pieces a decoder or a GRPO trainer reuses: project → steps → project_output reproduces forward exactly; the
indexer's cache-ready keys and queries; top-k record and replay; indexer parameters marked by attribute."""

import pytest
import torch

from dsa_dist.model.dsa_core import attend, dsa_attention, project_indexer, select_topk
from dsa_dist.model.indexer import is_indexer_parameter
from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.model.runtime import DENSE, SPARSE_INFERENCE, SPARSE_TRAIN, WARMUP
from dsa_dist.model.specs import dsa_attention_spec
from dsa_dist.ops import dispatch
from dsa_dist.parallel import rows_to_all
from tests._dist import single_rank_parallel
from tests.model._configs import model_config


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    with single_rank_parallel():
        yield


def _attention(name, runtime, topk=8, seed=0):
    from megatron.core.transformer.spec_utils import build_module

    cfg = model_config(name, init_std=0.3, indexer={"topk": topk})
    tracker = IndexerLossTracker()
    torch.manual_seed(seed)
    attn = build_module(dsa_attention_spec(cfg, runtime, tracker), config=cfg.to_transformer_config(None),
                        layer_number=1)
    return cfg, attn, tracker


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("runtime", [DENSE, SPARSE_INFERENCE], ids=["dense", "sparse"])
def test_project_steps_project_output_reproduce_forward(name, runtime):
    cfg, attn, tracker = _attention(name, runtime)
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size)
    tracker.begin_forward()
    ref, ref_bias = attn(x, None)

    xb = x.transpose(0, 1)  # [b, s, hidden]
    positions = torch.arange(cfg.seq_len)
    inputs = attn.project(xb, positions)
    # The composed steps ...
    o = dsa_attention(inputs, indexer=attn.indexer, dsa=cfg, runtime=runtime, dims=attn.dims, tracker=None, layer=1)
    out, bias = attn.project_output(o)
    assert bias is ref_bias is None
    assert torch.equal(out.transpose(0, 1), ref)
    # ... and the single steps, as a decoder calls them.
    v = inputs.k[..., : inputs.v_dim] if inputs.v is None else inputs.v
    topk = None
    if runtime.attention == "sparse":
        rows = project_indexer(attn.indexer, inputs, attn.dims)
        topk = rows_to_all(select_topk(attn.indexer, rows, cfg.indexer.topk, attn.dims), attn.dims)
    o2, lse = attend(inputs.q, inputs.k, v, softmax_scale=cfg.softmax_scale, positions=positions, topk=topk)
    assert lse.shape == o2.shape[:3]
    assert torch.equal(attn.project_output(o2)[0].transpose(0, 1), ref)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_index_keys_and_queries_give_the_layer_topk(name):
    """An FP8 index-key cache filled by ``index_keys`` (in two chunks, as decoding appends) selects the same keys."""
    cfg, attn, tracker = _attention(name, SPARSE_INFERENCE)
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size)
    tracker.begin_forward(record_topk=True)
    attn(x, None)
    recorded = tracker.topk()[1]
    inputs = attn.project(x.transpose(0, 1), torch.arange(cfg.seq_len))
    half = cfg.seq_len // 2
    pos = torch.arange(cfg.seq_len)
    chunks = [attn.indexer.index_keys(inputs.indexer_h[:, s], pos[s]) for s in (slice(0, half), slice(half, None))]
    k_cache = torch.cat([c[0] for c in chunks], 1)
    k_scale = torch.cat([c[1] for c in chunks], 1)
    assert k_cache.dtype == torch.float8_e4m3fn and k_scale.shape == (2, cfg.seq_len)
    q, w = attn.indexer.index_queries(inputs.indexer_cq, inputs.indexer_h, pos)
    idx = dispatch.lightning_indexer_topk(q, k_cache, w, cfg.indexer.topk, k_scale, q_positions=pos,
                                          k_positions=pos)[1]
    assert torch.equal(idx, recorded)
    assert (recorded[:, -1] >= 0).all() and (recorded[:, 0, 1:] == -1).all()


def _forward_backward(attn, tracker, x):
    """Forward, then backward of the KL: the fused sparse KL's value is known after the backward."""
    out, _ = attn(x, None)
    tracker.total().backward()
    return out.detach()


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_replaying_recorded_topk_reproduces_the_forward(name):
    cfg, attn, tracker = _attention(name, SPARSE_TRAIN)
    x = torch.randn(cfg.seq_len, 2, cfg.hidden_size)
    tracker.begin_forward(record_topk=True)
    out = _forward_backward(attn, tracker, x)
    recorded = tracker.topk()
    kl = tracker.values()[1]
    assert set(recorded) == {1} and recorded[1].shape == (2, cfg.seq_len, cfg.indexer.topk)

    tracker.begin_forward(replay_topk=recorded, record_topk=True)
    replayed = _forward_backward(attn, tracker, x)
    assert torch.equal(replayed, out) and tracker.values()[1] == kl
    assert torch.equal(tracker.topk()[1], recorded[1])  # what was used is what is recorded

    # Other indices (each row's most recent k keys: causal, but not the indexer's choice) change output and KL.
    pos = torch.arange(cfg.seq_len)
    recent = pos[:, None] - torch.arange(cfg.indexer.topk)[None, :]
    other = torch.where(recent >= 0, recent, -1).to(torch.int32).expand(2, -1, -1)
    assert not torch.equal(other, recorded[1])
    tracker.begin_forward(replay_topk={1: other}, record_topk=True)
    changed = _forward_backward(attn, tracker, x)
    assert (changed - out).abs().max() > 1e-3
    assert tracker.values()[1] != pytest.approx(kl)
    assert torch.equal(tracker.topk()[1], other)


def test_replay_errors():
    cfg, attn, tracker = _attention("tiny", SPARSE_TRAIN)
    x = torch.randn(cfg.seq_len, 1, cfg.hidden_size)
    good = torch.full((1, cfg.seq_len, 4), -1, dtype=torch.int32)
    future = good.clone()
    future[0, 3, 0] = 5  # query at position 3 may not see key 5
    for replay, match in [({2: good}, "no indices for layer 1"), ({1: good[:, :10]}, "must have shape"),
                          ({1: good.float()}, "integer tensor"), ({1: future}, "causal key")]:
        tracker.begin_forward(replay_topk=replay)
        with pytest.raises(ValueError, match=match):
            attn(x, None)
    _, dense, tracker = _attention("tiny", WARMUP)
    tracker.begin_forward(replay_topk={1: good})
    with pytest.raises(ValueError, match="attention='sparse'"):
        dense(x, None)


def test_indexer_parameters_are_marked():
    _, attn, _ = _attention("tiny", SPARSE_TRAIN)
    by_name = {n for n, _ in attn.named_parameters() if n.startswith("indexer.")}
    marked = {n for n, p in attn.named_parameters() if is_indexer_parameter(p)}
    assert marked == by_name and len(marked) == 5  # wq, wk, k_norm (weight, bias), ww
    attn.double()  # dtype casts keep the Parameter objects, hence the mark
    assert {n for n, p in attn.named_parameters() if is_indexer_parameter(p)} == by_name
