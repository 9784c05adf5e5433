"""One rollout decode step (``DecodeEngine.step`` + ``sample_tokens``) asks for no host synchronisation, and the
decode-only paths it uses are exact (docs/design.md §1 "GRPO").

CPU: :class:`tests._host_sync.HostSyncRecorder` lists every call that would wait for the GPU on CUDA (``.item()``,
``bool(t)``, ``nonzero``, ``unique``, boolean indexing, ...) during a step of the tiny models with sequences at
different positions (the reference ops in-process; the Triton kernels' host code, with the decode key splits
forced on, in an interpreter child). The split sparse attention and the partial merge equal the unsplit op in
float64. GPU (``-m gpu``): ``torch.cuda.set_sync_debug_mode("error")`` around one step at B = 4, L = 4096.
Seeds: 0 (weights), 1 (cache contents and tokens), 2 (sampling); the GPU test's input seed is logged.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsa_dist.ops._checks import debug_checks_enabled
from dsa_dist.rl.sampling import SamplingParams, sample_tokens
from tests._host_sync import HostSyncRecorder
from tests._interpret import check_interpreted, run_interpreted


def _engine(name: str, attention: str, batch: int, length: int, device: torch.device):
    """A decode engine of model preset ``name`` whose cache holds ``length`` random rows per sequence (the
    decode cost and its host behaviour do not depend on the values; this skips a prefill)."""
    from dsa_dist.model import DSARuntime, build_model, preset
    from dsa_dist.rl.engine import DecodeEngine

    cfg = dataclasses.replace(preset(name), seq_len=max(preset(name).seq_len, length + 8))
    torch.manual_seed(0)
    model = build_model(cfg, runtime=DSARuntime(attention=attention, indexer_kl=False)).to(device)
    model.eval()
    engine = DecodeEngine(model, batch=batch, prefill_len=0, decode_len=length + 8)
    g = torch.Generator(device=device).manual_seed(1)
    for layer in engine.cache.layers:
        layer.key[:, :length].normal_(generator=g)
        if layer.value is not None:
            layer.value[:, :length].normal_(generator=g)
        keys = torch.randn(batch, length, layer.index_key.shape[-1], generator=g, device=device)
        layer.index_key[:, :length] = keys.to(layer.index_dtype).view(layer.index_key.dtype)
        if layer.index_scale is not None:
            layer.index_scale[:, :length].uniform_(0.5 / 448, 2.0 / 448, generator=g)
    return cfg, engine


def _step(engine, tokens, positions, gen, max_position):
    logits, _ = engine.step(tokens, positions, max_position=max_position)
    return sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.9), gen)[0]


def _recorded_step(name: str, attention: str, length: int = 40) -> list[str]:
    from tests._dist import single_rank_parallel

    with single_rank_parallel():
        cfg, engine = _engine(name, attention, 3, length, torch.device("cpu"))
        engine.record_topk = True
        positions = torch.tensor([length, length // 2, length - 11])  # different lengths in one batch
        tokens = torch.randint(0, cfg.vocab_size, (3,), generator=torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(2)
        _step(engine, tokens, positions, gen, None)  # warm-up: lazy imports, caches
        calls = []
        for bound in (None, length + 1):  # the whole cache, or the rows up to the host's bound (after the +1)
            with HostSyncRecorder() as rec:
                tokens = _step(engine, tokens, positions, gen, bound)
            calls += rec.calls
            positions = positions + 1
        return calls


@pytest.mark.parametrize("name,attention", [("tiny", "sparse"), ("tiny", "dense"), ("tiny-gqa", "sparse")])
def test_decode_step_asks_for_no_host_sync(name, attention):
    calls = _recorded_step(name, attention)
    assert calls == [], f"host syncs in a decode step: {calls}"


def triton_decode_step(name: str) -> None:
    """Interpreter child: the same step on the Triton kernels, with the indexer's decode key splits forced on."""
    import kernels.indexer_topk as kt

    kt.TARGET_PROGRAMS = 64  # B = 3 rows → score key splits and selection segments (k = 16, 300 keys: 2)
    assert kt.select_segments(3, 300, 16, torch.device("cpu")) > 1
    calls = _recorded_step(name, "sparse", 300)
    assert calls == [], f"host syncs in a decode step on the Triton kernels: {calls}"


@pytest.mark.timeout(600)
def test_triton_decode_step_asks_for_no_host_sync():
    results = run_interpreted(__name__, ["triton_decode_step:tiny"])
    check_interpreted(results, "triton_decode_step:tiny")


def test_max_position_must_bound_the_positions():
    from dsa_dist.rl.decode_attention import plan_step
    from dsa_dist.rl.kv_cache import CacheLayout

    layout = CacheLayout(8, 8)
    plan = plan_step(layout, torch.tensor([[3], [9]]), max_position=9)
    assert plan.rows == 10 and plan.visible.shape == (2, 1, 10)
    assert plan.visible[0, 0].tolist() == [True] * 4 + [False] * 6
    with pytest.raises(ValueError, match="max_position=5 is below"):
        plan_step(layout, torch.tensor([[3], [9]]), max_position=5)
    with pytest.raises(ValueError, match="host int"):
        plan_step(layout, torch.tensor([[3]]), max_position=torch.tensor(3))


def test_per_sequence_query_positions_shape_errors():
    from dsa_dist.ops.topk import lightning_indexer_topk

    q, k, w = torch.randn(2, 1, 2, 8), torch.randn(2, 5, 8), torch.randn(2, 1, 2)
    with pytest.raises(ValueError, match=r"q_positions must have shape \[1\] \(shared\) or \[2, 1\]"):
        lightning_indexer_topk(q, k, w, 2, q_positions=torch.zeros(3, 1, dtype=torch.long))
    idx = lightning_indexer_topk(q, k, w, 2, q_positions=torch.tensor([[4], [0]]))[1]
    assert idx[1, 0].tolist() == [0, -1]  # sequence 1 at position 0 sees key 0 only


@pytest.mark.parametrize("per_group", [False, True])
def test_split_sparse_attention_equals_one_call(per_group):
    """Slot groups attended separately and merged by log-sum-exp = the unsplit sparse attention (float64), with
    empty slots, a group of only empty slots and a row with no key at all."""
    from dsa_dist.ops.sparse_attention import sparse_attention
    from dsa_dist.rl.decode_attention import split_sparse_attention

    g = torch.Generator().manual_seed(1)
    b, n, h, hkv, d, dv, lk, slots = 3, 2, 4, 2 if per_group else 1, 24, 16, 50, 13
    q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, lk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, lk, hkv, dv, generator=g, dtype=torch.float64)
    shape = (b, n, hkv, slots) if per_group else (b, n, slots)
    idx = torch.randint(0, lk, shape, generator=g).to(torch.int32)
    idx[0, 0, ..., 5:] = -1  # groups past slot 5 hold only empty slots
    idx[1, 1] = -1  # no key at all: output 0, lse −inf
    want_out, want_lse = sparse_attention(q, k, v, idx, 0.3)
    for splits in (2, 3, 5):
        out, lse = split_sparse_attention(q, k, v, idx, 0.3, splits=splits)
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    assert torch.isneginf(lse[1, 1]).all() and (out[1, 1] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(debug_checks_enabled(), reason="DSA_DEBUG=1: the debug value checks synchronise by design")
@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_cuda_decode_step_does_not_synchronise(attention, gpu_seed):
    """B = 4 sequences at positions around L = 4096 (different ones), one step + sampling on the Triton kernels
    under sync debug mode "error": any synchronising CUDA call raises."""
    from dsa_dist.ops import dispatch
    from tests._dist import single_rank_parallel

    dev = torch.device("cuda")
    with single_rank_parallel():
        cfg, engine = _engine("tiny", attention, 4, 4096, dev)
        engine.record_topk = True
        positions = torch.tensor([4096, 4000, 4095, 3000], device=dev)
        tokens = torch.randint(0, cfg.vocab_size, (4,), device=dev)
        gen = torch.Generator(device=dev).manual_seed(2)
        before = dispatch.reference_fallbacks()
        tokens = _step(engine, tokens, positions, gen, 4096)  # warm-up: Triton compiles, caches fill
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for bound in (4097, None):
                positions = positions + 1
                tokens = _step(engine, tokens, positions, gen, bound)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert dispatch.reference_fallbacks() == before  # the kernels ran, not the reference ops
        assert tokens.shape == (4,) and bool(((tokens >= 0) & (tokens < cfg.vocab_size)).all())
