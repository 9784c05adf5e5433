"""Sampling transforms against float64 hand computations (dsa_dist/rl/sampling.py).

The reference builds the kept set with plain Python over a (logit desc, id asc) ordering and the distribution
with math.exp in float64; the sampler must agree exactly on the set and to float32 precision on log-probs.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsa_dist.rl.sampling import SamplingParams, kept_token_mask, restricted_log_softmax, sample_tokens

SEED = 20261126


def _reference(row: list[float], temperature: float, top_k: int, top_p: float) -> tuple[set[int], dict[int, float]]:
    """Kept set and log q over it, in float64, straight from the definition."""
    if temperature == 0.0:
        best = max(range(len(row)), key=lambda i: (row[i], -i))
        return {best}, {best: 0.0}
    scaled = [x / temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: (-scaled[i], i))
    if top_k:
        order = order[:top_k]
    z = sum(math.exp(scaled[i]) for i in order)
    probs = {i: math.exp(scaled[i]) / z for i in order}
    kept, mass = [], 0.0
    for i in order:
        if kept and mass >= top_p:
            break
        kept.append(i)
        mass += probs[i]
    z2 = sum(math.exp(scaled[i]) for i in kept)
    return set(kept), {i: scaled[i] - math.log(z2) for i in kept}


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6), (0.8, 7, 0.9), (1.0, 1, 1.0), (0.0, 0, 1.0),
])
def test_kept_set_and_logprobs_match_float64_reference(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(SEED)
    logits = torch.randn(6, 23, generator=gen, dtype=torch.float64) * 2.0
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    kept = kept_token_mask(logits, params)
    logq = restricted_log_softmax(logits, kept, temperature)
    token, logprob, kept2 = sample_tokens(logits, params, torch.Generator().manual_seed(SEED))
    assert torch.equal(kept, kept2)
    for b in range(logits.shape[0]):
        ref_set, ref_logq = _reference(logits[b].tolist(), temperature, top_k, top_p)
        assert set(torch.nonzero(kept[b]).flatten().tolist()) == ref_set
        for i, v in ref_logq.items():
            assert logq[b, i].item() == pytest.approx(v, abs=1e-5)
        assert int(token[b]) in ref_set
        assert logprob[b].item() == pytest.approx(ref_logq[int(token[b])], abs=1e-5)
        assert torch.isneginf(logq[b][~kept[b]]).all()


def test_top_p_ties_resolve_to_lowest_token_id():
    # Four equal logits (~0.25 each); top_p = 0.45 needs exactly two: ids 0 and 1.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, -30.0]])
    kept = kept_token_mask(logits, SamplingParams(top_p=0.45))
    assert kept[0].tolist() == [True, True, False, False, False]
    # The same for top-k on ties, and for greedy.
    kept = kept_token_mask(torch.tensor([[1.0, 3.0, 3.0, 3.0]]), SamplingParams(top_k=2))
    assert kept[0].tolist() == [False, True, True, False]
    tok, lp, _ = sample_tokens(torch.tensor([[1.0, 3.0, 3.0]]), SamplingParams(temperature=0.0),
                               torch.Generator().manual_seed(SEED))
    assert tok.tolist() == [1] and lp.tolist() == [0.0]


def test_top_p_one_keeps_every_token_even_with_underflowing_probabilities():
    logits = torch.tensor([[0.0, -200.0, -1000.0, 5.0]])
    assert kept_token_mask(logits, SamplingParams(top_p=1.0)).all()
    # A tiny top_p still keeps the single most likely token.
    assert kept_token_mask(logits, SamplingParams(top_p=1e-9))[0].tolist() == [False, False, False, True]


def test_top_k_one_is_greedy_with_zero_logprob():
    gen = torch.Generator().manual_seed(SEED)
    logits = torch.randn(5, 17, generator=gen)
    tok, lp, kept = sample_tokens(logits, SamplingParams(top_k=1, temperature=0.9), gen)
    assert torch.equal(tok, logits.argmax(-1))
    assert torch.equal(lp, torch.zeros(5))
    assert kept.sum(-1).tolist() == [1] * 5


def test_sampling_is_deterministic_per_generator_and_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)
    params = SamplingParams(temperature=0.8, top_k=4)
    a = sample_tokens(logits, params, torch.Generator().manual_seed(SEED))[0]
    b = sample_tokens(logits, params, torch.Generator().manual_seed(SEED))[0]
    assert torch.equal(a, b)
    _, ref = _reference(logits[0].tolist(), 0.8, 4, 1.0)
    freq = torch.bincount(a, minlength=5).double() / a.numel()
    assert freq[3].item() == 0.0  # outside the top-4
    for i, v in ref.items():
        assert freq[i].item() == pytest.approx(math.exp(v), abs=0.015)  # 20000 draws: std <= 0.0036


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        sample_tokens(torch.zeros(2, 3, 4), SamplingParams(), torch.Generator())
