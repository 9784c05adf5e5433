"""The GRPO loss terms of DeepSeek-V3.2 (paper §3.1; docs/design.md §1 "GRPO") as pure functions.

Shapes: ``B`` sequences (all prompts × G samples of this rank), ``T`` response positions, ``V`` vocabulary.
Per-token inputs are float ``[B, T]`` log-probabilities of the generated tokens; ``mask [B, T]`` marks real
response tokens (padding after a stop token is 0). Nothing here communicates: the caller passes the global token
count (summed over data-parallel ranks), so the loss is the same whatever the DP/CP layout.

The objective (maximised; the loss is its negative), per response token t of sequence i::

    r      = π_θ / π_old                                  (π_old: the trainer's recomputed old policy by default)
    surr   = min(r·Â_i, clip(r, 1−ε_low, 1+ε_high)·Â_i) · M_i     (M_i: off-policy sequence mask, 0 or 1)
    kl     = (π_θ/π_old) · (π_ref/π_θ − log(π_ref/π_θ) − 1)       (unbiased, importance-weighted K3)
    J      = Σ_{i,t} (surr − β·kl) / (global number of response tokens)

All probabilities are of the sampler's kept token set (keep sampling mask): see
:func:`dsa_dist.rl.sampling.restricted_log_softmax`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsa_dist.rl.sampling import restricted_log_softmax


def group_advantages(rewards: torch.Tensor, *, scale_by_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages ``Â_i = R_i − mean_g(R)`` (optionally ``/ (std_g(R) + eps)``) for rewards ``[P, G]``.

    ``P`` prompts × ``G`` samples each; the std is the population std (ddof 0) of each group, so a group of
    identical rewards gets advantage 0 in both forms. Returns ``[P, G]`` in the rewards' dtype.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (rewards.std(dim=1, correction=0, keepdim=True) + eps)
    return centred


def nonzero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Dynamic sampling: bool ``[P]``, True for groups whose rewards differ (the others carry no signal)."""
    return (rewards != rewards[:, :1]).any(dim=1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, kept_mask: torch.Tensor | None,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` under the tempered distribution restricted to ``kept_mask`` (keep sampling mask).

    Args:
        logits: ``[B, T, V]`` logits that predict ``tokens`` (position t's logits predict token t).
        tokens: ``[B, T]`` int64.
        kept_mask: ``[B, T, V]`` bool, the sampler's kept sets (None: full vocabulary).
        temperature: the sampler's temperature (0, greedy, is a one-token set: log-prob 0).

    Returns:
        ``logprob [B, T]`` float32 (differentiable) and the entropy ``[B, T]`` of the restricted distribution
        (detached).
    """
    if kept_mask is not None:
        # Padding slots after a stop token carry empty kept sets; give them the full vocabulary so that every
        # value stays finite (they are masked out of every sum, but NaN * 0 would still be NaN).
        kept_mask = kept_mask | ~kept_mask.any(dim=-1, keepdim=True)
    logq = restricted_log_softmax(logits, kept_mask, temperature)  # [B, T, V]
    logprob = logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a statistic, never back-propagated
        probs = logq.exp()
        entropy = -(probs * logq.masked_fill(probs == 0, 0.0)).sum(-1)  # 0·log 0 = 0 outside the kept set
    return logprob, entropy


def clipped_surrogate(logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, *,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss ``−min(r·Â, clip(r, 1−ε_low, 1+ε_high)·Â)`` and where the clip is active.

    ``advantages`` is per sequence ``[B]`` (broadcast over tokens). Returns ``loss [B, T]`` and ``clipped [B, T]``
    (bool: the clipped branch is the minimum, so the token gets no gradient).
    """
    adv = advantages.unsqueeze(-1).to(logprob.dtype)
    ratio = torch.exp(logprob - old_logprob)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(logprob: torch.Tensor, old_logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """Unbiased importance-weighted K3 estimate of KL(π_θ ‖ π_ref) per token, ``[B, T]``.

    ``(π_θ/π_old) · (π_ref/π_θ − log(π_ref/π_θ) − 1)``: the samples come from π_old, so the K3 estimator of
    KL(π_θ‖π_ref) needs the importance weight π_θ/π_old to be unbiased. The weight is not detached: the
    gradient of the expectation under the fixed π_old is then the gradient of the KL itself.
    """
    log_ref_ratio = ref_logprob - logprob
    return torch.exp(logprob - old_logprob) * (torch.exp(log_ref_ratio) - log_ref_ratio - 1.0)


def off_policy_sequence_mask(advantages: torch.Tensor, logprob: torch.Tensor, sampler_logprob: torch.Tensor,
                             mask: torch.Tensor, delta: float) -> torch.Tensor:
    """Off-policy sequence masking: bool ``[B]``, False for a sequence that is dropped from the surrogate.

    Dropped: ``Â_i < 0`` and ``mean_t log(π_old/π_θ) > δ`` over its response tokens, with π_old the sampler's
    probability. (Negative-advantage samples that the current policy has drifted far from are the ones whose
    updates destabilise training; positive-advantage ones are kept.) ``logprob`` may carry gradients; the
    mask does not.
    """
    mask = mask.to(logprob.dtype)
    log_ratio = (sampler_logprob - logprob.detach()) * mask
    mean = log_ratio.sum(-1) / mask.sum(-1).clamp_min(1.0)
    return ~((advantages < 0) & (mean > delta))


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, global_tokens: float | torch.Tensor) -> torch.Tensor:
    """``Σ per_token·mask / global_tokens``: this rank's share of a mean over every response token of the step.

    Summing the result over data-parallel ranks (their gradients are summed, not averaged) gives the token mean
    of the whole global batch, independent of how sequences are split over ranks and micro-batches.
    """
    return (per_token * mask.to(per_token.dtype)).sum() / global_tokens


@dataclass
class GRPOTerms:
    """One micro-batch's GRPO loss and its statistics (sums over tokens or sequences, for exact reduction)."""

    loss: torch.Tensor
    """Scalar to back-propagate: (−surrogate + β·KL) summed over tokens / global token count."""
    tokens: torch.Tensor
    """Response tokens in the micro-batch."""
    policy_loss_sum: torch.Tensor
    kl_sum: torch.Tensor
    clipped_sum: torch.Tensor
    entropy_sum: torch.Tensor
    approx_kl_sum: torch.Tensor
    """Σ ½(log π_old − log π_θ)² (the usual PPO diagnostic of how far an update moved the policy)."""
    abs_log_ratio_sum: torch.Tensor
    """Σ |log π_old_sampler − log π_θ| (the sampler/trainer mismatch that top-k replay should shrink)."""
    opsm_masked: torch.Tensor
    """Number of sequences dropped by off-policy sequence masking."""
    sequences: torch.Tensor


def grpo_terms(logprob: torch.Tensor, old_logprob: torch.Tensor, sampler_logprob: torch.Tensor,
               ref_logprob: torch.Tensor | None, entropy: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, global_tokens: float | torch.Tensor, *, eps_low: float, eps_high: float,
               kl_coeff: float, opsm_delta: float | None) -> GRPOTerms:
    """The GRPO loss of one micro-batch (module docstring) and its statistics.

    Args:
        logprob: ``[B, T]`` log π_θ of the response tokens (differentiable).
        old_logprob: ``[B, T]`` log π_old used in the ratio (trainer-recomputed or the sampler's).
        sampler_logprob: ``[B, T]`` the sampler's log-probs (for off-policy masking and the mismatch metric).
        ref_logprob: ``[B, T]`` log π_ref, or None when ``kl_coeff == 0``.
        entropy: ``[B, T]`` entropy of π_θ over the kept sets (statistics only).
        advantages: ``[B]`` one advantage per sequence.
        mask: ``[B, T]`` response-token mask.
        global_tokens: response tokens of the whole optimizer step over all DP ranks.
        opsm_delta: off-policy masking threshold δ (None: off).
    """
    maskf = mask.to(logprob.dtype)
    surrogate, clipped = clipped_surrogate(logprob, old_logprob, advantages, eps_low=eps_low, eps_high=eps_high)
    keep = torch.ones_like(advantages, dtype=torch.bool)
    if opsm_delta is not None:
        keep = off_policy_sequence_mask(advantages, logprob, sampler_logprob, mask, opsm_delta)
    surrogate_mask = maskf * keep.unsqueeze(-1).to(maskf.dtype)
    loss = token_mean(surrogate, surrogate_mask, global_tokens)
    kl_sum = torch.zeros((), dtype=logprob.dtype, device=logprob.device)
    if kl_coeff != 0.0:
        if ref_logprob is None:
            raise ValueError("kl_coeff != 0 needs ref_logprob (the frozen reference model's log-probs)")
        kl = k3_kl(logprob, old_logprob, ref_logprob)
        loss = loss + kl_coeff * token_mean(kl, mask, global_tokens)
        kl_sum = (kl.detach() * maskf).sum()
    with torch.no_grad():
        diff = (old_logprob - logprob) * maskf
        return GRPOTerms(
            loss=loss, tokens=maskf.sum(), policy_loss_sum=(surrogate * surrogate_mask).sum(), kl_sum=kl_sum,
            clipped_sum=(clipped.to(maskf.dtype) * surrogate_mask).sum(), entropy_sum=(entropy * maskf).sum(),
            approx_kl_sum=(0.5 * diff * diff).sum(),
            abs_log_ratio_sum=((sampler_logprob - logprob).abs() * maskf).sum(),
            opsm_masked=(~keep).sum().to(maskf.dtype), sequences=torch.tensor(float(mask.shape[0])))
