"""The decode step replayed as a CUDA graph (dsa_dist.rl.cuda_graph): on CUDA, graphed steps give the eager
steps' logits, selected indices and cache contents bit for bit; on CPU the wrapper refuses or runs eagerly and says
why. Seeds: 0 (weights), 1 (tokens)."""

import dataclasses

import pytest
import torch

from dsa_dist.ops._checks import debug_checks_enabled
from dsa_dist.rl.cuda_graph import GraphedDecodeStep

_DEBUG_CHECKS = debug_checks_enabled()


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    from tests._dist import single_rank_parallel

    with single_rank_parallel():
        yield


def _engine(attention: str, batch: int, record_topk: bool):
    from dsa_dist.model import DSARuntime, build_model, preset
    from dsa_dist.rl.engine import DecodeEngine

    base = preset("tiny")
    cfg = dataclasses.replace(base, seq_len=256, init_std=0.2, indexer=dataclasses.replace(base.indexer, topk=16))
    torch.manual_seed(0)
    model = build_model(cfg, runtime=DSARuntime(attention=attention, indexer_kl=False))
    return cfg, DecodeEngine(model, batch=batch, prefill_len=0, decode_len=64, record_topk=record_topk,
                             attention=attention)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_cpu_engine_runs_eagerly_and_says_why():
    cfg, engine = _engine("sparse", 2, False)
    with pytest.raises(RuntimeError, match="CUDA graph.*cpu"):
        GraphedDecodeStep(engine, fallback="raise")
    step = GraphedDecodeStep(engine)
    assert not step.graphed and "CUDA" in step.reason
    tokens, pos = torch.tensor([1, 2]), torch.tensor([0, 0])
    logits, _ = step(tokens, pos)
    assert logits.shape == (2, cfg.vocab_size) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="fallback"):
        GraphedDecodeStep(engine, fallback="never")


def test_debug_checks_keep_the_step_eager(monkeypatch):
    from dsa_dist.ops import _checks

    _, engine = _engine("sparse", 2, False)
    monkeypatch.setattr(_checks, "_DEBUG", True)
    monkeypatch.setattr(engine, "device", torch.device("cuda"))  # the debug rule comes before any CUDA use
    with pytest.raises(RuntimeError, match="DSA_DEBUG"):
        GraphedDecodeStep(engine, fallback="raise")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(_DEBUG_CHECKS, reason="DSA_DEBUG=1 keeps decode eager (its checks synchronise)")
@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_graphed_steps_equal_eager_steps(attention):
    cfg, eager = _engine(attention, 3, True)
    _, graphed_engine = _engine(attention, 3, True)
    step = GraphedDecodeStep(graphed_engine, fallback="raise")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=gen).cuda()
    for t in range(40):  # positions 0..39: the top-k set fills and then truncates at k=16
        pos = torch.full((3,), t, device="cuda")
        want_logits, want_sel = eager.step(tokens[:, t], pos)
        got_logits, got_sel = step(tokens[:, t], pos)
        assert step.graphed
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        assert want_sel.keys() == got_sel.keys()
        for layer in want_sel:
            assert torch.equal(got_sel[layer], want_sel[layer]), (t, layer)
    for a, b in zip(eager.cache.layers, graphed_engine.cache.layers):
        assert torch.equal(a.key, b.key) and torch.equal(a.index_key, b.index_key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(_DEBUG_CHECKS, reason="DSA_DEBUG=1 keeps decode eager (its checks synchronise)")
def test_graphed_rollout_equals_eager_rollout():
    from dsa_dist.rl.rollout import generate
    from dsa_dist.rl.sampling import SamplingParams

    cfg, engine = _engine("sparse", 1, False)
    model = engine.gpt
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 9, 30)]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=24)
    runs = [generate(model, prompts, params, generator=torch.Generator(device="cuda").manual_seed(2),
                     record_topk=True, cuda_graph=graph) for graph in (False, True)]
    eager, graphed = runs
    assert torch.equal(eager.tokens, graphed.tokens)
    assert torch.equal(eager.response_mask, graphed.response_mask)
    torch.testing.assert_close(graphed.logprobs, eager.logprobs, rtol=1e-5, atol=1e-5)
    for layer in eager.topk_indices:
        assert torch.equal(eager.topk_indices[layer], graphed.topk_indices[layer])


def test_split_dense_decode_equals_sdpa_dense_decode():
    """The split-KV dense decode (sparse kernel over every visible row, merged by lse) against PyTorch SDPA."""
    from dsa_dist.rl.engine import DecodeEngine

    cfg, sdpa = _engine("dense", 3, False)
    assert sdpa.dense_kernel == ("split" if sdpa.device.type == "cuda" else "sdpa")  # "auto"
    sdpa.dense_kernel = "sdpa"
    split = DecodeEngine(sdpa.gpt, batch=3, prefill_len=0, decode_len=64, attention="dense", dense_kernel="split")
    tokens = torch.randint(0, cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    for t in range(20):
        pos = torch.tensor([t, max(t - 3, 0), t // 2])
        a, _ = sdpa.step(tokens[:, t].to(sdpa.device), pos.to(sdpa.device))
        b, _ = split.step(tokens[:, t].to(sdpa.device), pos.to(sdpa.device))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="dense_kernel"):
        DecodeEngine(sdpa.gpt, batch=3, prefill_len=0, decode_len=64, dense_kernel="flash")
