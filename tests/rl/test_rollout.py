"""Rollout generation on the tiny models: incremental decode over the KV + FP8 index-key cache equals a full
forward of the same tokens (logits and the indexer's top-k, dense and sparse, MLA and GQA, one rank, CP=2 and
TP=2 on gloo), the trainer's forward with the replayed indices reproduces the sampler's log-probs, seeded sampling
is reproducible, stop tokens and max_new_tokens end sequences. Seeds: SEED (weights), SEED + 1 (tokens), the
sampling generators' seeds inline."""

import dataclasses

import pytest
import torch

from dsa_dist.rl.sampling import SamplingParams, restricted_log_softmax
from tests._dist import run_distributed, single_rank_parallel

SEED = 2024
PROMPT_LENS = [7, 20, 13]  # different lengths in one batch; 20 + STEPS > k = 16, so the top-k really selects
STEPS = 20
B = len(PROMPT_LENS)
CASES = [("tiny", "sparse"), ("tiny", "dense"), ("tiny-gqa", "sparse"), ("tiny-gqa", "dense")]


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    with single_rank_parallel():
        yield


def _model(name: str, attention: str):
    from dsa_dist.model import DSARuntime, build_model, preset

    # A larger init than training's 0.02 makes attention and indexer scores far from uniform.
    cfg = dataclasses.replace(preset(name), init_std=0.2)
    torch.manual_seed(SEED)
    return cfg, build_model(cfg, runtime=DSARuntime(attention=attention, indexer_kl=False))


def _tokens(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, vocab, (B, max(PROMPT_LENS) + STEPS), generator=g)


def _teacher_forced(model, tokens: torch.Tensor):
    """Prefill the prompts, then decode STEPS given tokens: logits [B, STEPS, V] and top-k {layer: [B, STEPS, k]}
    of the rows P_b − 1 + t."""
    from dsa_dist.rl.engine import DecodeEngine, prefill_multiple

    multiple = prefill_multiple(model.decoder.layers[0].self_attention.dims)
    lens = torch.tensor(PROMPT_LENS)
    prefill_len = -(-(max(PROMPT_LENS) - 1) // multiple) * multiple
    engine = DecodeEngine(model, batch=B, prefill_len=prefill_len, decode_len=max(PROMPT_LENS) + STEPS,
                          record_topk=True)
    engine.prefill(tokens[:, :prefill_len])
    logits, topk = [], {}
    for t in range(STEPS):
        pos = lens - 1 + t
        step_logits, selected = engine.step(tokens[torch.arange(B), pos], pos)
        logits.append(step_logits)
        for layer, idx in selected.items():
            topk.setdefault(layer, []).append(idx)
    return torch.stack(logits, 1), {layer: torch.stack(v, 1) for layer, v in topk.items()}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Rows P_b − 1 + t (t < STEPS) of a full-sequence tensor [B, L, ...] → [B, STEPS, ...]."""
    rows = torch.tensor(PROMPT_LENS)[:, None] - 1 + torch.arange(STEPS)
    return x[torch.arange(B)[:, None], rows]


def _full_forward(model, tokens, **begin):
    from dsa_dist.model import get_indexer_loss_tracker

    tracker = get_indexer_loss_tracker(model)
    tracker.begin_forward(**begin)
    with torch.no_grad():
        logits = model(tokens, None, None)  # [B, L, V]
    return logits, tracker.topk()


@pytest.mark.parametrize("name,attention", CASES)
def test_incremental_decode_equals_full_forward(name, attention):
    cfg, model = _model(name, attention)
    tokens = _tokens(cfg.vocab_size)
    logits, topk = _teacher_forced(model, tokens)
    ref_logits, ref_topk = _full_forward(model, tokens, record_topk=True)
    torch.testing.assert_close(logits, _rows(ref_logits).float(), rtol=1e-4, atol=1e-4)
    for layer, idx in topk.items():  # the cache's top-k is the full forward's, ties and −1 slots included
        assert torch.equal(idx, _rows(ref_topk[layer])), f"layer {layer}"
    assert int((topk[1] == -1).sum()) > 0 and int(topk[1][:, -1].ge(0).all())  # short and full rows both seen


LAYOUTS = [(1, 2), (2, 1)]  # (tp, cp) on 2 gloo ranks: the cache sharded by sequence, then heads split by TP
PARALLEL_CASES = [("tiny", "sparse"), ("tiny-gqa", "dense")]


def _parallel_worker(rank: int, world: int):
    from dsa_dist.parallel import init_parallel
    from dsa_dist.rl.rollout import generate

    out = {}
    for tp, cp in LAYOUTS:
        init_parallel(tp, cp)
        for name, attention in PARALLEL_CASES:
            cfg, model = _model(name, attention)
            out[(tp, cp, name, attention)] = _teacher_forced(model, _tokens(cfg.vocab_size))
        cfg, model = _model("tiny", "sparse")
        prompts = [p.tolist() for p in _tokens(cfg.vocab_size)[:, :4]]
        gen = torch.Generator().manual_seed(11)
        r = generate(model, prompts, SamplingParams(temperature=1.0, top_k=20, max_new_tokens=8), generator=gen,
                     record_topk=True)
        out[(tp, cp, "generate")] = (r.tokens, r.logprobs, r.topk_indices, r.prompt_topk)
    return out


@pytest.mark.timeout(300)
def test_cp2_and_tp2_decode_equal_single_rank():
    from dsa_dist.rl.rollout import generate

    per_rank = run_distributed(_parallel_worker, 2, timeout=280)
    for name, attention in PARALLEL_CASES:
        cfg, model = _model(name, attention)
        ref_logits, ref_topk = _teacher_forced(model, _tokens(cfg.vocab_size))
        for res in per_rank:
            for tp, cp in LAYOUTS:
                logits, topk = res[(tp, cp, name, attention)]
                torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
                for layer, idx in ref_topk.items():
                    assert torch.equal(topk[layer], idx), (tp, cp, name, attention, layer)
    cfg, model = _model("tiny", "sparse")
    prompts = [p.tolist() for p in _tokens(cfg.vocab_size)[:, :4]]
    r = generate(model, prompts, SamplingParams(temperature=1.0, top_k=20, max_new_tokens=8),
                 generator=torch.Generator().manual_seed(11), record_topk=True)
    for res in per_rank:
        for tp, cp in LAYOUTS:
            tokens, logprobs, topk, prompt_topk = res[(tp, cp, "generate")]
            assert torch.equal(tokens, r.tokens), (tp, cp)
            torch.testing.assert_close(logprobs, r.logprobs, rtol=1e-4, atol=1e-4)
            for layer in r.topk_indices:  # recorded selections (prefill rows gathered over CP) match too
                assert torch.equal(topk[layer], r.topk_indices[layer]), (tp, cp, layer)
                assert torch.equal(prompt_topk[layer], r.prompt_topk[layer]), (tp, cp, layer)


def _prompts(vocab: int) -> list[list[int]]:
    tokens = _tokens(vocab)
    return [tokens[b, :n].tolist() for b, n in enumerate(PROMPT_LENS)]


def _trainer_logprobs(model, rollout, params, **begin) -> torch.Tensor:
    """The trainer's view: one full forward of the rollout tokens, keep-sampling-mask log-probs of the responses."""
    logits, _ = _full_forward(model, rollout.tokens, **begin)
    n = rollout.response_mask.shape[1]
    rows = rollout.prompt_lens[:, None] - 1 + torch.arange(n)
    step_logits = logits[torch.arange(rollout.tokens.shape[0])[:, None], rows]  # [B, N, V]
    logq = restricted_log_softmax(step_logits, rollout.kept_mask, params.temperature)
    lp = logq.gather(-1, rollout.response_tokens()[..., None]).squeeze(-1)
    return torch.where(rollout.response_mask, lp, 0.0)


def test_replayed_indices_reproduce_sampler_logprobs():
    from dsa_dist.model.builder import dsa_attention_layers
    from dsa_dist.rl.rollout import generate, replay_topk

    cfg, model = _model("tiny", "sparse")
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=STEPS)
    r = generate(model, _prompts(cfg.vocab_size), params, generator=torch.Generator().manual_seed(3),
                 record_topk=True)
    replay = replay_topk(r)
    # The replayed rows are the ones a recording forward of the same weights selects (prompt and response rows).
    _, recorded = _full_forward(model, r.tokens, record_topk=True)
    used = torch.arange(r.tokens.shape[1])[None, :] < (r.prompt_lens + r.response_lens - 1)[:, None]
    for layer, idx in replay.items():
        assert torch.equal(idx[used], recorded[layer][used])
    torch.testing.assert_close(_trainer_logprobs(model, r, params), r.logprobs, rtol=1e-5, atol=1e-5)
    # The indexer moves (as it does while training by its KL): without replay the trainer attends elsewhere and
    # its log-probs leave the sampler's; with replay they stay equal.
    with torch.no_grad():
        for attn in dsa_attention_layers(model):
            attn.indexer.wq.weight.normal_(generator=torch.Generator().manual_seed(5))
    moved = _trainer_logprobs(model, r, params)
    assert (moved - r.logprobs).abs().max() > 1e-3
    replayed = _trainer_logprobs(model, r, params, replay_topk=replay)
    torch.testing.assert_close(replayed, r.logprobs, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_reproducible():
    from dsa_dist.rl.rollout import generate

    cfg, model = _model("tiny-gqa", "sparse")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12)
    prompts = _prompts(cfg.vocab_size)
    a = generate(model, prompts, params, generator=torch.Generator().manual_seed(7), record_topk=True)
    b = generate(model, prompts, params, generator=torch.Generator().manual_seed(7), record_topk=True)
    c = generate(model, prompts, params, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.kept_mask, b.kept_mask)
    assert all(torch.equal(a.topk_indices[k], b.topk_indices[k]) for k in a.topk_indices)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (B, max(PROMPT_LENS) + 12) and a.kept_mask.shape == (B, 12, cfg.vocab_size)
    for i, p in enumerate(prompts):  # prompt kept, response right after it
        assert a.tokens[i, : len(p)].tolist() == p
    torch.testing.assert_close(_trainer_logprobs(model, a, params), a.logprobs, rtol=1e-5, atol=1e-5)


def test_stop_tokens_and_max_new_tokens():
    from dsa_dist.rl.rollout import generate

    cfg, model = _model("tiny", "dense")
    prompts = _prompts(cfg.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    free = generate(model, prompts, greedy, generator=torch.Generator().manual_seed(0), pad_id=1)
    assert free.response_mask.all() and free.response_mask.shape == (B, 10)
    assert torch.equal(free.logprobs, torch.zeros(B, 10))  # greedy: the kept set is one token
    resp = free.response_tokens()
    stop = int(resp[0, 3])  # sequence 0 emits it at step 3 (or earlier)
    r = generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,)),
                 generator=torch.Generator().manual_seed(0), pad_id=1)
    for b in range(B):
        hits = (resp[b] == stop).nonzero()
        n = int(hits[0]) + 1 if hits.numel() else 10  # the stop token is part of the response
        assert int(r.response_lens[b]) == n
        assert torch.equal(r.response_tokens()[b, :n], resp[b, :n])  # same tokens up to the stop
        p = PROMPT_LENS[b]
        assert bool((r.tokens[b, p + n:] == 1).all())  # then padding
        assert not r.kept_mask[b, n:].any() and bool((r.logprobs[b, n:] == 0).all())
    assert r.response_mask.shape[1] == int(r.response_lens.max())  # stops once every sequence has finished
    with pytest.raises(ValueError, match="prompts\\[1\\]"):
        generate(model, [[1, 2], []], greedy, generator=torch.Generator())
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[1, cfg.vocab_size]], greedy, generator=torch.Generator())


def test_decode_benchmark_smoke(tmp_path):
    """benchmarks/decode.py end to end at tiny sizes on CPU (the GPU run uses the same code at the small model)."""
    import json

    from benchmarks.decode import main

    main(["--smoke", "--lengths", "24", "--batches", "2", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "decode.json").read_text())
    (row,) = result["results"]
    assert row["cache_len"] == 24 and row["batch"] == 2
    assert row["sparse"]["tokens_per_s"] > 0 and row["dense"]["tokens_per_s"] > 0
    assert row["sparse"]["host_syncs"] == 0 and row["dense"]["host_syncs"] == 0  # the CPU recorder's count
    assert "| 24 | 2 |" in (tmp_path / "decode.md").read_text()


def test_one_token_prompts_and_engine_input_errors():
    """Prompts of one token (nothing to prefill) next to longer ones; clear errors for misuse of the engine."""
    from dsa_dist.rl.engine import DecodeEngine
    from dsa_dist.rl.rollout import generate, replay_topk

    cfg, model = _model("tiny", "sparse")
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    for prompts in ([[5], [9]], [[5], [1, 2, 3, 4, 5]]):
        r = generate(model, prompts, params, generator=torch.Generator().manual_seed(1), record_topk=True)
        assert r.response_mask.all() and r.tokens[:, 0].tolist() == [p[0] for p in prompts]
        torch.testing.assert_close(_trainer_logprobs(model, r, params), r.logprobs, rtol=1e-5, atol=1e-5)
        replayed = _trainer_logprobs(model, r, params, replay_topk=replay_topk(r))
        torch.testing.assert_close(replayed, r.logprobs, rtol=1e-5, atol=1e-5)
    engine = DecodeEngine(model, batch=2, prefill_len=4, decode_len=4)
    with pytest.raises(ValueError, match="prefill tokens must be"):
        engine.prefill(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="step takes tokens and positions"):
        engine.step(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond the cache capacity"):
        engine.step(torch.zeros(2, dtype=torch.long), torch.tensor([3, 8]))
    with pytest.raises(ValueError, match="does not match"):
        DecodeEngine(model, batch=3, prefill_len=4, decode_len=4, cache=engine.cache)
    with pytest.raises(ValueError, match="attention must be"):
        DecodeEngine(model, batch=2, prefill_len=4, decode_len=4, attention="flash")
