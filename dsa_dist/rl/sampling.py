"""Token sampling for rollouts: temperature, top-k, top-p, and the kept-token set (docs/design.md §1 "GRPO").

The sampler draws each token from the *tempered, truncated* distribution

    q(v) = softmax(logits / T)[v] restricted to the kept set K and renormalised,

where K is the top-k tokens (by logit) and then the smallest top-p prefix of the renormalised top-k
distribution. The GRPO trainer replays K exactly (the **keep sampling mask**: π_θ and π_old are evaluated as
log-softmax restricted to the sampler's K, not to a recomputed set), so this module returns K with every token.

Determinism: ties are broken by the lower token id everywhere (a stable descending sort), so the kept set is the
shortest prefix of the vocabulary ordered by (logit desc, id asc); the draw uses only ``torch.rand`` from the
caller's ``torch.Generator`` (inverse CDF in float64), so a seeded generator gives the same tokens on CPU and GPU.
Temperature 0 is greedy decoding: K is the arg-max (lowest id on ties) and its log-prob is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How rollout tokens are drawn (validated on construction)."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (arg-max, lowest token id on ties)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest prefix of tokens whose probability mass reaches top_p (1.0: off)."""
    top_k: int = 0
    """Keep only the top_k most likely tokens (0: off; 1: greedy)."""
    max_new_tokens: int = 16
    """Tokens generated per prompt at most."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Generation of a sequence stops after it emits one of these ids (the stop token is part of the response)."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"sampling.temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling.top_p={self.top_p!r}: must be in (0, 1] (1.0 disables nucleus sampling)")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k!r}: must be >= 0 (0 disables top-k)")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens!r}: must be >= 1")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """Whether every draw is the arg-max (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` in float32 (T = 0, greedy, leaves them unscaled: only their arg-max matters)."""
    logits = logits.float()
    return logits if temperature in (0.0, 1.0) else logits / temperature


def kept_token_mask(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's kept set K: bool ``[..., V]``, True for tokens that may be drawn (at least one per row).

    Args:
        logits: ``[..., V]`` raw logits of the next token.
        params: temperature / top_k / top_p.
    """
    scaled = tempered(logits, params.temperature)
    vocab = scaled.shape[-1]
    top_k = 1 if params.temperature == 0.0 else params.top_k
    if top_k == 0 and params.top_p >= 1.0:
        return torch.ones_like(scaled, dtype=torch.bool)
    # Stable descending sort: equal logits keep ascending ids, so ties resolve to the lowest token id.
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep_sorted[..., top_k:] = False
    if params.top_p < 1.0:
        masked = sorted_logits.masked_fill(~keep_sorted, float("-inf"))
        probs = torch.softmax(masked.double(), dim=-1)  # the renormalised top-k distribution, in sorted order
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked strictly higher
        # Keep a token while the mass above it is still short of top_p: the shortest prefix reaching top_p.
        keep_sorted &= mass_before < params.top_p
        keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def restricted_log_softmax(logits: torch.Tensor, kept_mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """``log q`` over the vocabulary: log-softmax of ``logits / T`` restricted to ``kept_mask`` (−inf outside).

    Differentiable in ``logits``; the computation the sampler uses for its log-probs and the GRPO trainer uses
    for π_θ, π_old and π_ref (keep sampling mask). ``kept_mask=None`` means the full vocabulary.
    Returns float32 ``[..., V]``.
    """
    scaled = tempered(logits, temperature)
    if kept_mask is not None:
        if kept_mask.shape != scaled.shape:
            raise ValueError(f"kept_mask shape {tuple(kept_mask.shape)} != logits shape {tuple(scaled.shape)}")
        scaled = scaled.masked_fill(~kept_mask, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row from the tempered, truncated distribution.

    Args:
        logits: ``[B, V]`` next-token logits (any float dtype, any device).
        params: the sampling settings.
        generator: the source of randomness (its device may differ from ``logits``'); one ``torch.rand`` of
            ``B`` values per call, also in greedy mode, so the generator's stream does not depend on the mode.

    Returns:
        ``token [B] int64``, ``logprob [B] float32`` (log q(token) under the distribution it was drawn from),
        ``kept_mask [B, V] bool`` (the kept set K).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    kept = kept_token_mask(logits, params)
    logq = restricted_log_softmax(logits, kept, params.temperature)  # [B, V]
    u = torch.rand(logits.shape[0], generator=generator, device=generator.device, dtype=torch.float64)
    u = u.to(logits.device)
    if params.temperature == 0.0:
        token = kept.to(torch.int8).argmax(dim=-1)  # the single kept token
    else:
        # Inverse CDF in float64: the first token whose cumulative probability exceeds u * total. A token outside
        # K has probability 0, so its cumulative value equals its predecessor's: it can never be the first to pass.
        cdf = torch.cumsum(logq.double().exp(), dim=-1)  # [B, V]
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        # u < 1 keeps u * cdf[-1] below the last cumulative value, so a token is always found; it has positive
        # probability, hence lies in K.
    logprob = logq.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    return token, logprob, kept
