"""Prompt generators, verifiers and the fault-tolerant reward runner (dsa_dist/rl/rewards.py)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from dsa_dist.rl.rewards import (
    Prompt,
    PromptGenerator,
    arithmetic_reward,
    arithmetic_shaped_reward,
    load_reward,
    passkey_min_length,
    passkey_reward,
    score_responses,
)
from dsa_dist.train.data import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("length", [120, 300, 1000])
def test_passkey_prompts_have_the_configured_length_and_contain_only_their_key(length):
    gen = PromptGenerator("passkey", TOK, seed=3, lengths=(length,))
    for i in range(4):
        p = gen(i)
        text = TOK.decode(p.tokens)
        assert len(p.tokens) == length
        assert text.endswith("What is the pass key? The pass key is")
        assert len(p.answer) == 5 and p.answer.isdigit()
        assert set(_numbers(text)) == {p.answer}  # the haystack has no digits: only the key can be retrieved
        assert p.prompt_id == f"passkey-{i}"
        assert passkey_reward(p, f" {p.answer}. yes") == 1.0
        assert passkey_reward(p, f" {int(p.answer) + 1}.") == 0.0
        assert passkey_reward(p, " I do not know") == 0.0


def _numbers(text: str) -> list[str]:
    import re

    return re.findall(r"\d+", text)


def test_passkey_too_short_names_the_key_and_minimum():
    with pytest.raises(ValueError, match=rf"rl.task.lengths.*>= {passkey_min_length(TOK)}"):
        PromptGenerator("passkey", TOK, seed=0, lengths=(50,))(0)


def test_prompts_are_a_pure_function_of_seed_and_index():
    a = PromptGenerator("arithmetic", TOK, seed=11, digits=4, operations=("+", "-", "*"))
    b = PromptGenerator("arithmetic", TOK, seed=11, digits=4, operations=("+", "-", "*"))
    assert a.batch(5, 3) == [b(5), b(6), b(7)]
    assert a(5) != PromptGenerator("arithmetic", TOK, seed=12, digits=4)(5)


def test_arithmetic_answers_are_the_python_result():
    gen = PromptGenerator("arithmetic", TOK, seed=1, digits=3, operations=("+", "-", "*"))
    ops = set()
    for i in range(40):
        p = gen(i)
        expr = TOK.decode(p.tokens)
        assert expr.endswith("=")
        ops |= {c for c in expr if c in "+-*"}
        assert int(p.answer) == eval(expr[:-1])  # noqa: S307 - the test's independent check of "a op b"
        assert arithmetic_reward(p, p.answer + "\n") == 1.0
        assert arithmetic_reward(p, "x" + p.answer) == 1.0
        assert arithmetic_reward(p, str(int(p.answer) + 1)) == 0.0
    assert ops == {"+", "-", "*"}


def test_shaped_reward_gives_format_credit_below_a_correct_answer():
    p = Prompt("arithmetic-0", TOK.encode("12+30="), "42", "arithmetic")
    assert arithmetic_shaped_reward(p, "42") == 1.0
    assert arithmetic_shaped_reward(p, "41") == pytest.approx(0.5)
    assert arithmetic_shaped_reward(p, "4a") == pytest.approx(0.25)
    assert arithmetic_shaped_reward(p, "") == 0.0


def test_load_reward_by_dotted_path_and_clear_errors():
    assert load_reward("dsa_dist.rl.rewards.passkey_reward") is passkey_reward
    with pytest.raises(ValueError, match="rl.reward.*dotted path"):
        load_reward("passkey_reward")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward("no_such_module.fn")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_reward("dsa_dist.rl.rewards.nope")


def test_failing_rewards_score_zero_and_are_reported_with_the_prompt_id(caplog):
    prompts = [Prompt(f"t-{i}", [1], str(i), "arithmetic") for i in range(3)]

    def flaky(prompt: Prompt, response: str) -> float:
        if response == "raise":
            raise RuntimeError("verifier crashed")
        if response == "nan":
            return math.nan
        if response == "str":
            return "high"  # type: ignore[return-value]
        return 1.0 if response == prompt.answer else 0.25

    responses = ["0", "raise", "1", "nan", "str", "2"]
    with caplog.at_level(logging.WARNING, logger="dsa_dist.rl.rewards"):
        rewards, failures = score_responses(flaky, prompts, responses, group_size=2)
    assert rewards.tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    assert torch.isfinite(rewards).all()
    assert [(f.prompt_id, f.sample) for f in failures] == [("t-0", 1), ("t-1", 1), ("t-2", 0)]
    assert "RuntimeError: verifier crashed" in failures[0].error and "nan" in failures[1].error
    assert "t-0" in caplog.text and "t-2" in caplog.text
    with pytest.raises(ValueError, match="responses for 3 prompts"):
        score_responses(flaky, prompts, responses[:5], group_size=2)
