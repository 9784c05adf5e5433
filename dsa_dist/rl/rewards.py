"""Verifiable tasks for GRPO: prompt generators, reward functions and a fault-tolerant reward runner.

A reward function is any callable ``reward(prompt: Prompt, response: str) -> float`` named by its dotted path in
the config (``rl.reward: dsa_dist.rl.rewards.passkey_reward``); :func:`load_reward` imports it. Built in, with the
byte tokenizer of :mod:`dsa_dist.train.data`:

- ``passkey``: long-context passkey retrieval at configurable prompt lengths (the needle and question of
  :func:`dsa_dist.train.tasks.passkey`, in the classic repeated-sentence haystack); :func:`passkey_reward` is 1
  when the first number of the response is the key.
- ``arithmetic``: ``"417+86="`` with multi-digit operands; :func:`arithmetic_reward` is 1 for the exact result.
  :func:`arithmetic_shaped_reward` adds a format credit (share of digits among the response's characters,
  worth at most 0.5) so that a tiny model from scratch gets a learnable signal; exact answers still score 1.

Prompts are a pure function of ``(seed, global prompt index)``, so a resumed run draws the same prompts.
:func:`score_responses` runs the reward on every sample: a reward that raises or returns a non-finite or
non-numeric value scores 0, is reported with its prompt id (a warning, and in the returned failures that the
trainer counts in TensorBoard), and never stops the run or reaches the advantages as NaN.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dsa_dist.train.data import Tokenizer
from dsa_dist.train.tasks import min_seq_len, passkey

log = logging.getLogger(__name__)

TASK_NAMES = ("passkey", "arithmetic")
# The haystack of the original passkey test (Mohtashami & Jaggi, 2023): repetitive text with no digits, so the
# key is the only number in the prompt.
HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Prompt:
    """One generated prompt and what a verifier needs to score a response to it."""

    prompt_id: str
    """Stable id ``<task>-<global index>`` (reported with reward failures)."""
    tokens: list[int]
    """The prompt's token ids."""
    answer: str
    """The expected answer text (the key, or the arithmetic result)."""
    task: str
    """The task name."""


RewardFn = Callable[[Prompt, str], float]


# ------------------------------------------------------------------------------------------------ prompts
def passkey_min_length(tok: Tokenizer) -> int:
    """The shortest passkey prompt (needle + question, almost no haystack) with ``tok``."""
    return min_seq_len("passkey", tok) - len(tok.encode(" 00000."))


def passkey_prompt(rng: np.random.Generator, length: int, tok: Tokenizer) -> tuple[list[int], str]:
    """A passkey prompt of exactly ``length`` tokens ending in "The pass key is"; returns (tokens, key)."""
    if length < passkey_min_length(tok):
        raise ValueError(f"rl.task.lengths: a passkey prompt of {length} tokens is too short for the needle and "
                         f"question; use lengths >= {passkey_min_length(tok)}")
    filler = np.asarray(tok.encode(HAYSTACK * (length // len(HAYSTACK) + 2)), dtype=np.int64)
    # tasks.passkey builds a window whose last tokens are " <key>."; the prompt is everything before them.
    answer_len = len(tok.encode(" 00000."))
    sample = passkey(rng, filler, length + answer_len - 1, tok)
    n_answer = int(sample.answer_mask.sum())
    tokens = sample.window[:-n_answer].tolist()
    key = _NUMBER.search(tok.decode(sample.window[-n_answer:].tolist())).group()
    return tokens, key


def arithmetic_prompt(rng: np.random.Generator, digits: int, operations: Sequence[str],
                      tok: Tokenizer) -> tuple[list[int], str]:
    """``"<a><op><b>="`` with operands of 1..``digits`` digits; returns (tokens, result as text)."""
    a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, digits + 1)))) for _ in range(2))
    op = operations[int(rng.integers(len(operations)))]
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return tok.encode(f"{a}{op}{b}="), str(result)


class PromptGenerator:
    """The deterministic prompt stream of a task: prompt ``g`` is drawn from ``default_rng([seed, g])``."""

    def __init__(self, task: str, tok: Tokenizer, *, seed: int, lengths: Sequence[int] = (256,),
                 digits: int = 3, operations: Sequence[str] = ("+",)) -> None:
        if task not in TASK_NAMES:
            raise ValueError(f"rl.task.name={task!r}: unknown task; choose one of {list(TASK_NAMES)}")
        bad = [op for op in operations if op not in ("+", "-", "*")]
        if bad or not operations:
            raise ValueError(f"rl.task.operations={list(operations)!r}: use a non-empty subset of ['+', '-', '*']")
        self.task, self.tok, self.seed = task, tok, seed
        self.lengths, self.digits, self.operations = tuple(lengths), digits, tuple(operations)

    def __call__(self, index: int) -> Prompt:
        rng = np.random.default_rng([self.seed, index])
        if self.task == "passkey":
            length = self.lengths[int(rng.integers(len(self.lengths)))]
            tokens, answer = passkey_prompt(rng, length, self.tok)
        else:
            tokens, answer = arithmetic_prompt(rng, self.digits, self.operations, self.tok)
        return Prompt(prompt_id=f"{self.task}-{index}", tokens=tokens, answer=answer, task=self.task)

    def batch(self, start: int, count: int) -> list[Prompt]:
        """Prompts ``start .. start + count - 1`` of the stream."""
        return [self(i) for i in range(start, start + count)]


# ------------------------------------------------------------------------------------------------ verifiers
def first_number(text: str) -> str | None:
    """The first integer in ``text`` (with its sign), or None."""
    m = _NUMBER.search(text)
    return m.group() if m else None


def passkey_reward(prompt: Prompt, response: str) -> float:
    """1.0 when the first number in the response is the pass key, else 0.0."""
    return float(first_number(response) == prompt.answer)


def arithmetic_reward(prompt: Prompt, response: str) -> float:
    """1.0 when the first number in the response is the exact result, else 0.0."""
    return float(first_number(response) == prompt.answer)


def arithmetic_shaped_reward(prompt: Prompt, response: str) -> float:
    """1.0 for the exact result, else 0.5 × the share of digit characters in the response (format credit)."""
    if arithmetic_reward(prompt, response) == 1.0:
        return 1.0
    return 0.5 * sum(c.isdigit() for c in response) / max(len(response), 1)


# ------------------------------------------------------------------------------------------------ runner
def load_reward(path: str) -> RewardFn:
    """Import the reward function named by ``path`` (``package.module.function``)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"rl.reward={path!r}: give a dotted path 'package.module.function' "
                         "(e.g. dsa_dist.rl.rewards.passkey_reward)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"rl.reward={path!r}: cannot import module {module_name!r} ({err}); check the path "
                         "and that the module is importable (PYTHONPATH)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"rl.reward={path!r}: {module_name} has no callable {attr!r}; name a function "
                         "reward(prompt, response) -> float")
    return fn


@dataclass(frozen=True)
class RewardFailure:
    """A sample whose reward could not be computed (scored 0)."""

    prompt_id: str
    sample: int
    """Index of the sample within its group."""
    error: str


def score_responses(reward_fn: RewardFn, prompts: Sequence[Prompt], responses: Sequence[str], group_size: int
                    ) -> tuple[torch.Tensor, list[RewardFailure]]:
    """Rewards ``[P, G]`` float64 of ``responses`` (prompt-major: ``responses[p * G + g]``) and the failures.

    A failing sample (exception, NaN/inf, or a value that is not a real number) scores 0 and is logged with its
    prompt id; the other samples are unaffected.
    """
    if len(responses) != len(prompts) * group_size:
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x group_size {group_size}")
    rewards = torch.zeros(len(prompts), group_size, dtype=torch.float64)
    failures: list[RewardFailure] = []
    for p, prompt in enumerate(prompts):
        for g in range(group_size):
            try:
                value = reward_fn(prompt, responses[p * group_size + g])
                if isinstance(value, torch.Tensor):
                    value = value.item()
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"reward is {value}")
            except Exception as err:  # noqa: BLE001 - any reward bug must cost one sample, not the run
                failures.append(RewardFailure(prompt.prompt_id, g, f"{type(err).__name__}: {err}"))
                continue
            rewards[p, g] = value
    _warn(failures)
    return rewards, failures


def _warn(failures: list[RewardFailure]) -> None:
    """One warning per prompt and error (not per sample), naming the prompt id and the failed samples."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for f in failures:
        grouped.setdefault((f.prompt_id, f.error), []).append(f.sample)
    for (prompt_id, error), samples in grouped.items():
        log.warning("reward failed for prompt %s, samples %s (scored 0): %s", prompt_id, samples, error)
