"""The ``rl`` section of the run config: GRPO settings of the ``grpo`` stage (docs/design.md §1 "GRPO").

A GRPO *iteration* draws ``prompts_per_iteration`` prompts (over all data-parallel ranks), samples
``group_size`` responses to each, scores them, and takes ``updates_per_iteration`` optimizer steps on that
rollout batch. ``stages.grpo.steps`` (or ``train.steps``) counts iterations; so do ``stages.grpo.warmup_steps``
and ``checkpoint.interval`` in this stage (the LR schedule runs over iterations × updates_per_iteration
optimizer steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from dsa_dist.rl.sampling import SamplingParams

if TYPE_CHECKING:
    from dsa_dist.config import TrainRunConfig


@dataclass
class RLTaskConfig:
    """The generated prompts (dsa_dist/rl/rewards.py)."""

    name: Literal["passkey", "arithmetic"] = "arithmetic"
    """'passkey' (long-context retrieval) or 'arithmetic' (multi-digit a+b=)."""
    lengths: list[int] = field(default_factory=lambda: [256])
    """passkey: prompt lengths in tokens; each prompt draws one of them."""
    digits: int = 3
    """arithmetic: operands have 1..digits digits."""
    operations: list[str] = field(default_factory=lambda: ["+"])
    """arithmetic: operators drawn from (a subset of '+', '-', '*')."""


@dataclass
class RLSamplingConfig:
    """How rollouts sample (dsa_dist.rl.sampling.SamplingParams)."""

    temperature: float = 1.0
    """Softmax temperature (0: greedy). π_θ, π_old and π_ref are evaluated at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: off)."""
    top_k: int = 0
    """Sample among the top_k tokens only (0: off)."""
    max_new_tokens: int = 8
    """Response length limit in tokens."""
    stop_token_ids: list[int] = field(default_factory=lambda: [256])
    """A response ends after one of these tokens (default: the byte tokenizer's end-of-document id)."""

    def params(self) -> SamplingParams:
        """These settings as :class:`SamplingParams`."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(self.stop_token_ids))


@dataclass
class GRPOLossConfig:
    """The GRPO objective (dsa_dist/rl/losses.py)."""

    eps_low: float = 0.2
    """Lower clip range of the ratio: clip(r, 1 - eps_low, ...)."""
    eps_high: float = 0.28
    """Upper clip range of the ratio: clip(r, ..., 1 + eps_high)."""
    kl_coeff: float = 0.01
    """β of the unbiased K3 KL to the frozen reference model (0: no reference model is built)."""
    advantage_std: bool = False
    """Divide group advantages by the group's reward std (the paper's form is without)."""
    advantage_eps: float = 1e-6
    """Added to the std when advantage_std is on."""
    opsm_delta: float | None = 1e-4
    """Off-policy sequence masking threshold δ on mean log(π_sampler/π_θ) (null: off)."""
    old_logprobs: Literal["trainer", "sampler"] = "trainer"
    """π_old of the ratio and of the KL weight: recomputed by the trainer before the updates, or the sampler's."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (zero advantage, no signal) before the updates."""


@dataclass
class RLConfig:
    """GRPO post-training (the ``grpo`` stage)."""

    reward: str = "dsa_dist.rl.rewards.arithmetic_reward"
    """Dotted path of the reward function ``reward(prompt, response) -> float``."""
    task: RLTaskConfig = field(default_factory=RLTaskConfig)
    sampling: RLSamplingConfig = field(default_factory=RLSamplingConfig)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    prompts_per_iteration: int = 8
    """Prompts per iteration over all data-parallel ranks (a multiple of parallel.dp)."""
    group_size: int = 8
    """G: responses sampled per prompt (>= 2: advantages compare samples of one prompt)."""
    updates_per_iteration: int = 2
    """Optimizer steps on each rollout batch (each step uses the whole batch)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (gradient accumulation inside an optimizer step)."""
    indexer_loss_coeff: float | None = None
    """Weight of the indexer's sparse KL during GRPO (null: model.indexer_loss_coeff; 0 freezes the indexers)."""
    replay_indexer_topk: bool = False
    """The trainer's forward attends to the top-k indices the sampler recorded (keep the indexer's choice)."""
    cuda_graph: bool = True
    """Replay each rollout decode step as a CUDA graph (GPU with TP = CP = 1; elsewhere decode runs eagerly). An
    eager step of the small model is launch-bound (~6,500 ops per token); docs/grpo.md has the measurements."""


def validate_rl(cfg: TrainRunConfig) -> None:
    """Raise ``ValueError`` (key path, bad value, fix) for an unusable ``rl`` section; no-op without 'grpo'."""
    if "grpo" not in cfg.pipeline:
        return
    from dsa_dist.config.validate import require
    from dsa_dist.rl.rewards import load_reward, passkey_min_length
    from dsa_dist.train.data import ByteTokenizer

    rl, m, p = cfg.rl, cfg.model, cfg.parallel

    require(p.cp == 1, "parallel.cp", p.cp, "the grpo stage runs with cp=1 (rollout batches are short); "
            "set parallel.cp=1 or drop 'grpo' from the pipeline")
    require(rl.group_size >= 2, "rl.group_size", rl.group_size, "must be >= 2 (advantages compare a group)")
    require(rl.prompts_per_iteration >= 1 and rl.prompts_per_iteration % p.dp == 0, "rl.prompts_per_iteration",
            rl.prompts_per_iteration, f"must be a positive multiple of parallel.dp={p.dp}")
    require(rl.updates_per_iteration >= 1, "rl.updates_per_iteration", rl.updates_per_iteration, "must be >= 1")
    require(rl.micro_batch_size >= 1, "rl.micro_batch_size", rl.micro_batch_size, "must be >= 1")
    lo = rl.loss
    require(0.0 <= lo.eps_low < 1.0, "rl.loss.eps_low", lo.eps_low, "must be in [0, 1)")
    require(lo.eps_high >= 0.0, "rl.loss.eps_high", lo.eps_high, "must be >= 0")
    require(lo.kl_coeff >= 0.0, "rl.loss.kl_coeff", lo.kl_coeff, "must be >= 0 (0: no KL term)")
    require(lo.advantage_eps > 0.0, "rl.loss.advantage_eps", lo.advantage_eps, "must be > 0")
    require(lo.opsm_delta is None or lo.opsm_delta >= 0.0, "rl.loss.opsm_delta", lo.opsm_delta,
            "must be >= 0, or null to turn off-policy sequence masking off")
    require(rl.indexer_loss_coeff is None or rl.indexer_loss_coeff >= 0.0, "rl.indexer_loss_coeff",
            rl.indexer_loss_coeff, "must be >= 0 (0 freezes the indexers), or null for model.indexer_loss_coeff")
    s = rl.sampling
    try:
        s.params()
    except ValueError as err:
        raise ValueError(f"rl.{err}") from None
    bad = [t for t in s.stop_token_ids if not 0 <= t < m.vocab_size]
    require(not bad, "rl.sampling.stop_token_ids", s.stop_token_ids,
            f"ids {bad} are outside the vocabulary [0, model.vocab_size={m.vocab_size})")
    load_reward(rl.reward)  # raises ValueError naming rl.reward

    t = rl.task
    if t.name == "passkey":
        need = passkey_min_length(ByteTokenizer())
        require(len(t.lengths) > 0 and min(t.lengths) >= need, "rl.task.lengths", t.lengths,
                f"give at least one length, each >= {need} (needle + question)")
        longest = max(t.lengths)
    else:
        require(t.digits >= 1, "rl.task.digits", t.digits, "must be >= 1")
        bad_ops = [o for o in t.operations if o not in ("+", "-", "*")]
        require(t.operations and not bad_ops, "rl.task.operations", t.operations,
                "use a non-empty subset of ['+', '-', '*']")
        longest = 2 * t.digits + 2  # "<a><op><b>="
    require(m.vocab_size >= ByteTokenizer.vocab_size, "model.vocab_size", m.vocab_size,
            f"GRPO prompts use the byte tokenizer: use >= {ByteTokenizer.vocab_size}")
    require(longest + s.max_new_tokens <= m.seq_len, "rl.sampling.max_new_tokens", s.max_new_tokens,
            f"the longest prompt ({longest} tokens) plus the response must fit model.seq_len={m.seq_len}; "
            "lower max_new_tokens or the prompt length, or raise model.seq_len")
