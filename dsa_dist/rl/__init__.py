"""GRPO post-training (stage 3 of the DeepSeek-V3.2 recipe, docs/design.md §1 "GRPO").

- :mod:`dsa_dist.rl.sampling`: temperature / top-k / top-p sampling and the kept-token set.
- :mod:`dsa_dist.rl.rollout`: batched KV-cache generation with the model's own sparse attention.
- :mod:`dsa_dist.rl.rewards`: prompt generators, verifiers and the fault-tolerant reward runner.
- :mod:`dsa_dist.rl.losses`: the GRPO loss terms as pure functions.
- :mod:`dsa_dist.rl.config`: the ``rl`` section of the run config.
- :mod:`dsa_dist.rl.trainer`: the ``grpo`` stage.
"""

from dsa_dist.rl.sampling import SamplingParams, kept_token_mask, restricted_log_softmax, sample_tokens

__all__ = ["SamplingParams", "kept_token_mask", "restricted_log_softmax", "sample_tokens"]
