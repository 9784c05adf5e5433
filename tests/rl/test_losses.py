"""GRPO loss terms against hand-written float64 computations on fixed small tensors (dsa_dist/rl/losses.py).

Each reference is plain Python over lists (math.exp / math.log), written from the formula in the module
docstring, independent of the torch code under test. The DP test runs 2 gloo ranks, each with half the batch
and the global token count, and checks that the summed gradients equal the 1-rank gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsa_dist.rl.losses import (
    clipped_surrogate,
    group_advantages,
    grpo_terms,
    k3_kl,
    nonzero_variance_groups,
    off_policy_sequence_mask,
    token_logprobs,
    token_mean,
)
from tests._dist import run_distributed

SEED = 7

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, -1.0, 0.0, 3.0]]
# Per-token log-probs of 3 sequences x 4 positions; the mask marks real response tokens.
LOGP = [[-0.5, -1.2, -0.1, -2.0], [-0.3, -0.9, -1.5, -0.2], [-1.1, -0.05, -0.7, -0.4]]
OLD = [[-0.6, -1.0, -0.4, -2.0], [-0.1, -1.4, -1.5, -0.9], [-0.8, -0.02, -0.2, -0.4]]
REF = [[-0.7, -1.3, -0.2, -1.0], [-0.2, -1.0, -1.1, -0.3], [-1.5, -0.1, -0.9, -0.8]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
ADV = [0.8, -0.6, -1.3]


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def test_group_advantages_both_forms():
    adv = group_advantages(t(REWARDS))
    adv_std = group_advantages(t(REWARDS), scale_by_std=True, eps=1e-6)
    for g, row in enumerate(REWARDS):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        for i, r in enumerate(row):
            assert adv[g, i].item() == pytest.approx(r - mean, abs=1e-12)
            assert adv_std[g, i].item() == pytest.approx((r - mean) / (std + 1e-6), abs=1e-12)
    assert adv_std[1].abs().max().item() == 0.0  # zero variance -> zero advantage, no NaN
    with pytest.raises(ValueError, match="prompts, group_size"):
        group_advantages(t([1.0, 2.0]))


def test_dynamic_sampling_drops_zero_variance_groups():
    assert nonzero_variance_groups(t(REWARDS)).tolist() == [True, False, True]


def test_clipped_surrogate_matches_hand_computation():
    loss, clipped = clipped_surrogate(t(LOGP), t(OLD), t(ADV), eps_low=0.2, eps_high=0.28)
    for i in range(3):
        for j in range(4):
            r = math.exp(LOGP[i][j] - OLD[i][j])
            a = ADV[i]
            c = min(max(r, 0.8), 1.28)
            assert loss[i, j].item() == pytest.approx(-min(r * a, c * a), abs=1e-12)
            assert bool(clipped[i, j]) == (c * a < r * a)
    assert clipped.any() and not clipped.all()  # the fixture exercises both branches


def test_k3_kl_matches_hand_computation_and_is_unbiased():
    kl = k3_kl(t(LOGP), t(OLD), t(REF))
    for i in range(3):
        for j in range(4):
            w = math.exp(LOGP[i][j]) / math.exp(OLD[i][j])
            x = math.exp(REF[i][j]) / math.exp(LOGP[i][j])
            assert kl[i, j].item() == pytest.approx(w * (x - math.log(x) - 1.0), abs=1e-12)
    # Unbiasedness: E_{v ~ π_old}[k3(v)] == KL(π_θ || π_ref) exactly, over a full 5-token distribution.
    gen = torch.Generator().manual_seed(SEED)
    p_old, p_theta, p_ref = (torch.softmax(torch.randn(5, generator=gen, dtype=torch.float64), 0) for _ in range(3))
    estimate = (p_old * k3_kl(p_theta.log(), p_old.log(), p_ref.log())).sum().item()
    exact = sum(a * math.log(a / b) for a, b in zip(p_theta.tolist(), p_ref.tolist()))
    assert estimate == pytest.approx(exact, abs=1e-12)


def test_off_policy_sequence_mask_matches_hand_computation():
    delta = 0.05
    keep = off_policy_sequence_mask(t(ADV), t(LOGP), t(OLD), t(MASK), delta)
    expected = []
    for i in range(3):
        n = sum(MASK[i])
        mean = sum((OLD[i][j] - LOGP[i][j]) * MASK[i][j] for j in range(4)) / n
        expected.append(not (ADV[i] < 0 and mean > delta))
    assert keep.tolist() == expected
    assert expected == [True, True, False]  # seq 0: positive advantage; seq 1: mean -0.25 <= delta; seq 2: 0.165


def test_keep_sampling_mask_logprobs_are_restricted_to_the_kept_set():
    gen = torch.Generator().manual_seed(SEED)
    logits = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    kept = torch.rand(2, 3, 6, generator=gen) < 0.6
    kept[..., 2] = True
    tokens = torch.full((2, 3), 2, dtype=torch.long)
    temperature = 0.7
    logp, ent = token_logprobs(logits, tokens, kept, temperature)
    for b in range(2):
        for s in range(3):
            xs = [x / temperature for x, k in zip(logits[b, s].tolist(), kept[b, s].tolist()) if k]
            z = math.log(sum(math.exp(x) for x in xs))
            assert logp[b, s].item() == pytest.approx(logits[b, s, 2].item() / temperature - z, abs=1e-5)
            assert ent[b, s].item() == pytest.approx(-sum(math.exp(x - z) * (x - z) for x in xs), abs=1e-5)
    full, _ = token_logprobs(logits, tokens, None, temperature)  # no mask: the full vocabulary
    assert ((full < logp) | kept.all(-1)).all()  # strictly lower wherever the mask drops a token


def test_grpo_loss_is_the_global_token_mean_of_surrogate_and_kl():
    eps_low, eps_high, beta, delta = 0.2, 0.28, 0.05, 0.05
    logp = t(LOGP).requires_grad_(True)
    terms = grpo_terms(logp, t(OLD), t(OLD), t(REF), torch.zeros(3, 4, dtype=torch.float64), t(ADV), t(MASK),
                       20.0, eps_low=eps_low, eps_high=eps_high, kl_coeff=beta, opsm_delta=delta)
    keep = [True, True, False]
    total = clipped = approx_kl = abs_ratio = 0.0
    for i in range(3):
        for j in range(4):
            if not MASK[i][j]:
                continue
            r = math.exp(LOGP[i][j] - OLD[i][j])
            c = min(max(r, 1 - eps_low), 1 + eps_high) * ADV[i]
            surr = min(r * ADV[i], c) if keep[i] else 0.0
            clipped += float(keep[i] and c < r * ADV[i])
            approx_kl += 0.5 * (OLD[i][j] - LOGP[i][j]) ** 2
            abs_ratio += abs(OLD[i][j] - LOGP[i][j])
            x = math.exp(REF[i][j] - LOGP[i][j])
            total += -surr + beta * r * (x - math.log(x) - 1.0)
    assert terms.loss.item() == pytest.approx(total / 20.0, abs=1e-12)
    assert terms.tokens.item() == 9 and terms.opsm_masked.item() == 1
    assert terms.clipped_sum.item() == clipped and clipped > 0
    assert terms.approx_kl_sum.item() == pytest.approx(approx_kl, abs=1e-12)
    assert terms.abs_log_ratio_sum.item() == pytest.approx(abs_ratio, abs=1e-12)  # sampler = OLD here
    terms.loss.backward()
    assert logp.grad[0, 3] == 0 and logp.grad[2, 2:].abs().sum() == 0  # padding gets no gradient


def test_token_mean_over_two_dp_ranks_equals_one_rank():
    one = _dp_loss_and_grad(0, 1)
    two = run_distributed(_dp_worker, 2, timeout=120.0)
    grad = two[0]["grad"] + two[1]["grad"]  # DDP with per-token loss sums gradients over DP
    loss = two[0]["loss"] + two[1]["loss"]
    assert loss.item() == pytest.approx(one["loss"].item(), abs=1e-12)
    torch.testing.assert_close(grad, one["grad"], rtol=0, atol=1e-12)


def _dp_loss_and_grad(rank: int, world: int) -> dict:
    # 4 sequences of unequal lengths: a per-rank mean would weight the ranks' tokens differently.
    gen = torch.Generator().manual_seed(SEED)
    logits = torch.randn(4, 5, 7, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 7, (4, 5), generator=gen)
    old = torch.randn(4, 5, generator=gen, dtype=torch.float64) * 0.1 - 2.0
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([0.5, -1.0, 0.25, 1.5], dtype=torch.float64)
    weight = torch.ones(7, dtype=torch.float64, requires_grad=True)  # a shared "parameter"
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    global_tokens = mask.sum()  # what the trainer all-reduces over DP before the step
    if world > 1:
        local = mask[rows].sum()
        torch.distributed.all_reduce(local)
        assert local == global_tokens
    logp, ent = token_logprobs(logits[rows] * weight, tokens[rows], None, 1.0)
    terms = grpo_terms(logp, old[rows], old[rows], None, ent, adv[rows], mask[rows], global_tokens,
                       eps_low=0.2, eps_high=0.28, kl_coeff=0.0, opsm_delta=None)
    terms.loss.backward()
    return {"loss": terms.loss.detach(), "grad": weight.grad.detach()}


def _dp_worker(rank: int, world: int) -> dict:
    return _dp_loss_and_grad(rank, world)


def test_token_mean_is_sum_over_global_count():
    x = t([[1.0, 2.0], [3.0, 4.0]])
    assert token_mean(x, t([[1, 0], [1, 1]]), 10.0).item() == pytest.approx((1 + 3 + 4) / 10.0)
