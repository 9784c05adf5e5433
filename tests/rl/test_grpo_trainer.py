"""The ``grpo`` stage on the tiny model (dsa_dist/rl/trainer.py): it learns, resumes exactly, survives bad rewards.

- Learning: on the arithmetic prompts with the shaped reward (format credit for digits), 12 seeded GRPO
  iterations raise the mean reward far above anything the frozen initial policy reaches on the *same* prompts and
  sampler seeds (the control runs first in the same process: rollouts only, no updates).
- Chaining and resume: ``run_pipeline`` (the ``dsa-train`` path) runs sparse -> grpo; GRPO starts from the sparse
  checkpoint, which is also its reference. A GRPO run from that checkpoint stopped (and checkpointed) after 2 of 4
  iterations and resumed by a new trainer repeats the uninterrupted run's metrics and final weights exactly; it
  writes the documented TensorBoard tags, and its reward function fails on some samples (counted, scored 0, no NaN;
  dynamic sampling then drops those all-zero groups).
"""

from __future__ import annotations

import math

import pytest
import torch

from dsa_dist.rl.rewards import Prompt, arithmetic_shaped_reward
from tests.train._tiny import CACHE, run_ranks

SEED = 4321
TIMING_KEYS = ("perf/rollout_tokens_per_s", "perf/train_tokens_per_s")


def _config(run_dir: str, *extra: str, world_size: int = 1):
    from pathlib import Path

    from dsa_dist.config import load_config

    overrides = [
        f"run_dir={run_dir}", "model.seq_len=32", "model.indexer.topk=8", "train.threads=1", f"train.seed={SEED}",
        "stages.grpo.lr=1e-2", "stages.grpo.min_lr=1e-2", "rl.loss.advantage_std=true",
        "rl.sampling.max_new_tokens=4", "rl.prompts_per_iteration=8", "rl.group_size=8",
        "checkpoint.interval=0", "logging.log_interval=1", "logging.progress=none", *extra,
    ]
    return load_config(Path(__file__).resolve().parents[2] / "configs" / "grpo_tiny.yaml", overrides,
                       world_size=world_size)


def flaky_reward(prompt: Prompt, response: str) -> float:
    """The shaped arithmetic reward, except that it raises or returns NaN on some prompts (fault injection)."""
    index = int(prompt.prompt_id.rsplit("-", 1)[1])
    if index % 5 == 1:
        raise RuntimeError("verifier crashed")
    if index % 5 == 3:
        return math.nan
    return arithmetic_shaped_reward(prompt, response)


def _learning_worker(rank: int, world_size: int, run_dir: str, iterations: int) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.rl.trainer import GRPOTrainer

    cfg = _config(run_dir, "logging.tensorboard=false")
    init_parallel(1, 1)
    trainer = GRPOTrainer(cfg)
    frozen = []
    for step in range(iterations):  # the control: the initial policy on the same prompts and sampler seeds
        trainer.step = step
        frozen.append(trainer.rollout()[1]["reward/mean"])
    trainer.step = 0
    start = _params(trainer)
    trained = [trainer.train_iteration() for _ in range(iterations)]
    changed = _changed(start, _params(trainer))
    # rl.indexer_loss_coeff=0 freezes the indexers (the rest still trains).
    frozen_indexer = GRPOTrainer(_config(f"{run_dir}/freeze", "logging.tensorboard=false",
                                         "rl.indexer_loss_coeff=0"))
    start = _params(frozen_indexer)
    frozen_indexer.train_iteration()
    return {"frozen": frozen, "trained": trained, "changed": changed,
            "changed_coeff0": _changed(start, _params(frozen_indexer)), "replay": _replay_mismatch(run_dir)}


def _replay_mismatch(run_dir: str) -> dict[str, float]:
    """Keep the indexer's choice: after the indexers drift (noise added, as training moves them), the trainer's
    log-probs of a rollout equal the sampler's with the sampler's top-k replayed, and differ without."""
    from dsa_dist.model.indexer import is_indexer_parameter
    from dsa_dist.rl.trainer import GRPOTrainer

    trainer = GRPOTrainer(_config(f"{run_dir}/replay", "logging.tensorboard=false", "model.indexer.topk=4",
                                  "rl.replay_indexer_topk=true"))
    batch, metrics = trainer.rollout()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in trainer.gpt.parameters():
            if is_indexer_parameter(p):
                p.add_(torch.randn(p.shape, generator=gen) * p.abs().mean())
    out = {}
    for mode, topk in (("replayed", batch.topk), ("own", None)):
        batch.topk = topk
        logp = trainer._frozen_logprobs(trainer.ddp, batch)
        out[mode] = float(((logp - batch.sampler_logprobs).abs() * batch.mask).max())
    return out


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.gpt.named_parameters()}


def _changed(before: dict, after: dict) -> dict[str, bool]:
    return {n: not torch.equal(before[n], after[n]) for n in before}


def test_grpo_raises_the_reward_beyond_a_frozen_policy(tmp_path):
    iterations = 12
    out = run_ranks(_learning_worker, 1, str(tmp_path), iterations)[0]
    frozen = out["frozen"]
    rewards = [r["reward/mean"] for r in out["trained"]]
    print(f"seed {SEED}: frozen {[round(x, 3) for x in frozen]}, GRPO {[round(x, 3) for x in rewards]}")
    assert rewards[0] == frozen[0]  # the first rollout is the same policy, prompts and seeds
    final = sum(rewards[-3:]) / 3
    assert final > max(frozen) + 0.15, (frozen, rewards)
    for rec in out["trained"]:
        assert all(math.isfinite(v) for k, v in rec.items() if isinstance(v, float)), rec
        assert 0.0 <= rec["policy/clip_fraction"] <= 1.0 and 0.0 <= rec["policy/opsm_masked_fraction"] <= 1.0
    assert out["trained"][-1]["policy/kl_ref"] > 0.0  # the policy moved away from the reference
    indexer = {n for n in out["changed"] if ".indexer." in n}
    assert indexer and all(out["changed"][n] for n in indexer)  # the indexers train on their sparse KL
    assert not any(out["changed_coeff0"][n] for n in indexer)
    assert any(c for n, c in out["changed_coeff0"].items() if n not in indexer)
    assert out["replay"]["replayed"] < 1e-5 < 1e-2 < out["replay"]["own"], out["replay"]


def _resume_worker(rank: int, world_size: int, dir_a: str, dir_b: str) -> dict:
    from dsa_dist.parallel import destroy_parallel, init_parallel
    from dsa_dist.rl.trainer import GRPOTrainer
    from dsa_dist.train.checkpoint import CheckpointError, latest_checkpoint
    from dsa_dist.train.loop import run_pipeline

    extra = ("stages.grpo.steps=4", "rl.reward=tests.rl.test_grpo_trainer.flaky_reward",
             "rl.loss.dynamic_sampling=true", "stages.sparse.steps=2", "stages.sparse.warmup_steps=0",
             "train.micro_batch_size=2",
             "train.global_batch_size=2", f"data.cache_dir={CACHE}", "data.stdlib_max_files=40")
    # Uninterrupted, through the dsa-train path: sparse (2 steps) -> grpo, chained by the sparse checkpoint.
    history = run_pipeline(_config(dir_a, *extra, "pipeline=[sparse,grpo]"))["grpo"]
    destroy_parallel()
    init_parallel(1, 1)
    sparse_ckpt = latest_checkpoint(f"{dir_a}/sparse/checkpoints")
    first_trainer = GRPOTrainer(_config(dir_b, *extra, "logging.tensorboard=false"), init_from=sparse_ckpt)
    out = {"first_start": first_trainer.start, "start_is_reference": all(
        torch.equal(p, r) for p, r in zip(first_trainer.gpt.parameters(), first_trainer.ref.parameters()))}
    first = first_trainer.run(until=2)
    resumed_trainer = GRPOTrainer(_config(dir_b, *extra, "logging.tensorboard=false"), init_from=sparse_ckpt)
    start = resumed_trainer.start
    resumed = resumed_trainer.run()
    uninterrupted = GRPOTrainer(_config(dir_a, *extra, "logging.tensorboard=false"),  # loads A's final checkpoint
                                init_from=sparse_ckpt)
    try:  # resuming against another reference (here: random weights instead of the sparse checkpoint) is refused
        GRPOTrainer(_config(dir_b, *extra, "logging.tensorboard=false"))
        out["wrong_reference"] = "accepted"
    except CheckpointError as err:
        out["wrong_reference"] = str(err)
    return out | {"a": history, "b": first + resumed, "start": start, "sparse_ckpt": str(sparse_ckpt),
                  "params_a": {n: p.detach().clone() for n, p in uninterrupted.gpt.named_parameters()},
                  "params_b": {n: p.detach().clone() for n, p in resumed_trainer.gpt.named_parameters()}}


def _tensorboard_tags(run_dir: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(f"{run_dir}/grpo/tensorboard")
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_resume_mid_grpo_repeats_the_uninterrupted_run(tmp_path):
    dir_a, dir_b = str(tmp_path / "a"), str(tmp_path / "b")
    out = run_ranks(_resume_worker, 1, dir_a, dir_b)[0]
    assert out["first_start"] == f"initialised from {out['sparse_ckpt']}" and out["start_is_reference"]
    assert out["start"].startswith("resumed from") and out["start"].endswith("step_00000002")
    assert "trained against the reference" in out["wrong_reference"], out["wrong_reference"]
    a, b = out["a"], out["b"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING_KEYS} == \
               {k: v for k, v in rb.items() if k not in TIMING_KEYS}
    for name, p in out["params_a"].items():
        assert torch.equal(p, out["params_b"][name]), name
    # Fault injection: prompts 1, 3, 6, 8, ... fail (raise / NaN) on all their 8 samples; the run goes on.
    assert a[-1]["reward/failures"] == 8 * sum(i % 5 in (1, 3) for i in range(4 * 8))
    assert all(math.isfinite(r["policy/loss"]) and math.isfinite(r["reward/mean"]) for r in a)
    # Dynamic sampling drops at least the failed prompts' groups (all 0: no variance), never all of them here.
    failed_groups = [sum(i % 5 in (1, 3) for i in range(8 * it, 8 * it + 8)) / 8 for it in range(4)]
    dropped = [r["rollout/dropped_group_fraction"] for r in a]
    assert all(f <= d < 1.0 for f, d in zip(failed_groups, dropped)), (failed_groups, dropped)
    tags = _tensorboard_tags(dir_a)
    for tag in ("reward/mean", "reward/std", "reward/accuracy", "reward/failures", "policy/kl_ref",
                "policy/clip_fraction", "policy/entropy", "rollout/response_length", "policy/opsm_masked_fraction",
                "policy/abs_log_ratio", "perf/rollout_tokens_per_s", "perf/train_tokens_per_s"):
        assert tag in tags, (tag, sorted(tags))


def _tp_worker(rank: int, world_size: int, run_dir: str) -> list[dict]:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.rl.trainer import GRPOTrainer

    cfg = _config(f"{run_dir}/tp{world_size}", "logging.tensorboard=false", f"parallel.tp={world_size}",
                  "rl.replay_indexer_topk=true", "rl.loss.old_logprobs=sampler", world_size=world_size)
    init_parallel(world_size, 1)
    trainer = GRPOTrainer(cfg)
    return [trainer.train_iteration() for _ in range(2)]


def test_tensor_parallel_grpo_matches_one_rank(tmp_path):
    """TP=2 (vocab-parallel logits gathered, replay of the sampler's top-k, the sampler's log-probs as π_old)
    repeats the TP=1 iterations."""
    one = run_ranks(_tp_worker, 1, str(tmp_path))[0]
    two = run_ranks(_tp_worker, 2, str(tmp_path))
    for r1, r2a, r2b in zip(one, two[0], two[1]):
        assert {k: v for k, v in r2a.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in r2b.items() if k not in TIMING_KEYS}  # both TP ranks report the same
        for key in ("reward/mean", "reward/std", "rollout/response_length", "policy/opsm_masked_fraction"):
            assert r2a[key] == r1[key], key  # the same samples were drawn
        for key in ("policy/loss", "policy/kl_ref", "policy/clip_fraction", "policy/entropy", "grad_norm",
                    "indexer_kl"):
            assert r2a[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key
