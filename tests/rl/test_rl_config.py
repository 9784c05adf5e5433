"""The ``rl`` config section and the ``grpo`` stage in the run config (dsa_dist/rl/config.py, dsa_dist/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsa_dist.config import load_config
from dsa_dist.train.stages import STAGES, resolve_stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _load(*overrides: str, path: Path = CONFIGS / "grpo_tiny.yaml"):
    return load_config(path, list(overrides), world_size=1)


def test_shipped_grpo_configs_load():
    cfg = _load()
    assert cfg.pipeline == ["grpo"] and cfg.rl.task.name == "arithmetic"
    params = cfg.rl.sampling.params()
    assert params.stop_token_ids == (10,) and params.max_new_tokens == 6
    gpu = _load("train.device=auto", "model.params_dtype=float32", path=CONFIGS / "grpo_single_gpu.yaml")
    assert gpu.rl.task.name == "passkey" and gpu.rl.replay_indexer_topk


def test_grpo_stage_is_sparse_and_chains_after_sparse():
    cfg = _load("pipeline=[dense,warmup,sparse,grpo]", "data.eval_tasks=[]")
    plan = resolve_stage(cfg, "grpo")
    assert plan.runtime.attention == "sparse" and plan.runtime.indexer_kl and STAGES["grpo"].trains == "all"
    assert plan.steps == cfg.stages.grpo.steps
    with pytest.raises(ValueError, match="order dense -> warmup -> sparse -> grpo"):
        _load("pipeline=[grpo,sparse]")


@pytest.mark.parametrize("override,match", [
    ("rl.group_size=1", r"rl.group_size=1: must be >= 2"),
    ("rl.prompts_per_iteration=0", r"rl.prompts_per_iteration=0"),
    ("rl.loss.eps_low=1.5", r"rl.loss.eps_low=1.5"),
    ("rl.loss.kl_coeff=-1", r"rl.loss.kl_coeff=-1"),
    ("rl.loss.opsm_delta=-0.1", r"rl.loss.opsm_delta"),
    ("rl.indexer_loss_coeff=-1", r"rl.indexer_loss_coeff"),
    ("rl.sampling.top_p=1.5", r"rl.sampling.top_p=1.5"),
    ("rl.sampling.temperature=-1", r"rl.sampling.temperature"),
    ("rl.sampling.stop_token_ids=[999]", r"rl.sampling.stop_token_ids.*outside the vocabulary"),
    ("rl.reward=dsa_dist.rl.rewards.missing", r"rl.reward=.*no callable 'missing'"),
    ("rl.task.operations=[/]", r"rl.task.operations"),
    ("rl.sampling.max_new_tokens=300", r"rl.sampling.max_new_tokens=300.*model.seq_len"),
    ("parallel.cp=2", r"parallel.cp=2: the grpo stage runs with cp=1"),
])
def test_bad_rl_values_name_the_key(override, match):
    extra = ["parallel.dp=1"] if override.startswith("parallel.cp") else []
    with pytest.raises(ValueError, match=match):
        load_config(CONFIGS / "grpo_tiny.yaml", [override, *extra], world_size=2 if extra else 1)


def test_passkey_lengths_are_checked_against_the_needle_and_the_context():
    with pytest.raises(ValueError, match=r"rl.task.lengths=\[40\].*>= \d+"):
        _load("rl.task.name=passkey", "rl.task.lengths=[40]")
    with pytest.raises(ValueError, match=r"rl.sampling.max_new_tokens.*longest prompt \(300 tokens\)"):
        _load("rl.task.name=passkey", "rl.task.lengths=[120,300]")
    assert _load("rl.task.name=passkey", "rl.task.lengths=[120,200]").rl.task.lengths == [120, 200]


def test_rl_section_is_ignored_without_a_grpo_stage():
    cfg = load_config(CONFIGS / "tiny.yaml", ["rl.group_size=1"], world_size=1)  # not validated: no grpo stage
    assert cfg.rl.group_size == 1
