"""Non-finite numbers in the ``grpo`` stage never reach a checkpoint (dsa_dist/rl/trainer.py, docs/fault_tolerance.md).

- A NaN loss that no reward causes (the frozen reference's final norm gets a NaN weight, so its logits, the KL
  term and every gradient are NaN): each update is skipped (weights, Adam state and LR unchanged) and counted; after
  ``train.max_nonfinite_steps`` in a row the run stops with a clear error. The checkpoints written before hold
  the untouched, finite weights and the skip count.
- A diverging learning rate (1e37): the weights stay finite but the next forwards overflow; the non-finite updates
  are skipped until the run stops with a clear error. Every checkpoint written restores finite weights.
- An applied update that overflows the weights (inf injected after Adam's step): the run stops at once, before any
  checkpoint of those weights is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.rl.test_grpo_trainer import _config
from tests.train._tiny import corrupt_a_shard, run_ranks

SMALL = ("rl.sampling.max_new_tokens=3", "rl.prompts_per_iteration=4", "rl.group_size=4", "logging.tensorboard=false",
         "checkpoint.interval=1", "stages.grpo.steps=6", "rl.updates_per_iteration=2", "train.max_nonfinite_steps=3")


def _finite_checkpoints(run_dir: str) -> dict[str, bool]:
    """Each checkpoint of the stage, restored on its own into a fresh trainer: are its weights finite?"""
    from dsa_dist.rl.trainer import GRPOTrainer

    out = {}
    probe = GRPOTrainer(_config(f"{run_dir}/probe", *SMALL))
    for path in sorted(Path(run_dir, "grpo", "checkpoints").glob("step_*")):
        probe.checkpoints.restore(probe.parts, path, full=False, layout=probe.layout(), seed=0)
        out[path.name] = all(bool(torch.isfinite(p).all()) for p in probe.gpt.parameters())
    return out


def _nan_loss_worker(rank: int, world_size: int, run_dir: str) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.rl.trainer import GRPOTrainer
    from dsa_dist.train.checkpoint import list_checkpoints, read_train_state
    from dsa_dist.train.errors import NonFiniteError

    init_parallel(1, 1)
    trainer = GRPOTrainer(_config(run_dir, *SMALL))
    start = [p.detach().clone() for p in trainer.gpt.parameters()]
    with torch.no_grad():  # fault injection: a NaN weight in the frozen reference's final norm (its logits only;
        # the policy and every indexer stay finite, so rollouts and top-k selection are unaffected)
        dict(trainer.ref.named_parameters())["decoder.final_layernorm.weight"].view(-1)[0] = float("nan")
    out: dict = {}
    try:
        trainer.run()
    except NonFiniteError as err:
        out["error"] = str(err)
    saved = list_checkpoints(Path(run_dir, "grpo", "checkpoints"))
    resumed = GRPOTrainer(_config(run_dir, *SMALL))
    return out | {
        "step": trainer.step, "skipped": trainer.guard.skipped, "saved": [p.name for p in saved],
        "states": [read_train_state(p) for p in saved],
        "unchanged": all(torch.equal(a, b) for a, b in zip(start, trainer.gpt.parameters())),
        "lr_unchanged": trainer.scheduler.num_steps == 0,
        "resumed_start": resumed.start, "resumed_skipped": resumed.guard.skipped,
        "resumed_equal": all(torch.equal(a, b) for a, b in zip(start, resumed.gpt.parameters())),
        "finite": _finite_checkpoints(run_dir)}


@pytest.mark.timeout(600)
def test_nan_loss_updates_are_skipped_counted_and_stop_the_run(tmp_path):
    out = run_ranks(_nan_loss_worker, 1, str(tmp_path / "run"))[0]
    # 2 updates per iteration: iteration 1 skips 2, iteration 2's first skip is the 3rd in a row.
    assert "training diverged: 3 steps in a row (up to iteration 2, update 1 of 2)" in out.get("error", ""), out
    assert out["step"] == 2 and out["skipped"] == 3
    assert out["unchanged"] and out["lr_unchanged"]  # no update and no LR-schedule step was applied
    assert out["saved"] == ["step_00000001"] and out["states"][0]["skipped_steps"] == 2
    assert out["finite"] == {"step_00000001": True}
    assert out["resumed_start"].endswith("step_00000001") and out["resumed_skipped"] == 2 and out["resumed_equal"]


def _diverge_worker(rank: int, world_size: int, run_dir: str, mode: str) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.rl.trainer import GRPOTrainer
    from dsa_dist.train.errors import NonFiniteError

    init_parallel(1, 1)
    if mode == "huge_lr":  # the first update takes every weight to ~1e37: finite, but the next forward overflows
        extra = ("stages.grpo.lr=1e37", "stages.grpo.min_lr=1e37", "optim.clip_grad=0")
    else:
        extra = ()
    trainer = GRPOTrainer(_config(run_dir, *SMALL, *extra))
    if mode == "overflow":  # an applied update that leaves inf in the weights (injected after Adam's step)
        def overflow(optimizer, args, kwargs) -> None:
            next(iter(optimizer.param_groups[0]["params"])).data.view(-1)[0] = float("inf")

        for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            opt.optimizer.register_step_post_hook(overflow)
    out: dict = {}
    try:
        trainer.run()
    except NonFiniteError as err:
        out["error"] = str(err)
    root = Path(run_dir, "grpo", "checkpoints")
    return out | {"step": trainer.step, "finite": _finite_checkpoints(run_dir),
                  "tmp": [p.name for p in root.glob(".tmp.*")] if root.exists() else [],
                  "weights_finite": all(bool(torch.isfinite(p).all()) for p in trainer.gpt.parameters())}


@pytest.mark.timeout(600)
def test_diverging_learning_rate_stops_and_saves_only_finite_weights(tmp_path):
    """LR 1e37: iteration 1's first update applies (weights ~1e37, still finite: its checkpoint is written); the
    updates after it overflow and are skipped until ``train.max_nonfinite_steps`` (3) in a row stop the run (or a
    rollout meets non-finite logits first: also a clear stop)."""
    out = run_ranks(_diverge_worker, 1, str(tmp_path / "run"), "huge_lr")[0]
    error = out.get("error", "")
    assert "training diverged: 3 steps in a row" in error or "non-finite logits" in error, out
    assert 1 <= out["step"] < 6 and out["weights_finite"]
    assert out["finite"] and all(out["finite"].values()) and out["tmp"] == [], out


@pytest.mark.timeout(600)
def test_update_that_overflows_the_weights_stops_before_any_save(tmp_path):
    out = run_ranks(_diverge_worker, 1, str(tmp_path / "run"), "overflow")[0]
    assert "made the policy's weights non-finite" in out.get("error", ""), out
    assert out["step"] == 1 and not out["weights_finite"]  # the first iteration's update overflowed them ...
    assert out["finite"] == {} and out["tmp"] == []  # ... and nothing of them was written


def _corrupt_worker(rank: int, world_size: int, run_dir: str) -> dict:
    import contextlib
    import io

    from dsa_dist.parallel import init_parallel
    from dsa_dist.rl.trainer import GRPOTrainer

    init_parallel(1, 1)
    cfg = _config(run_dir, *SMALL, "checkpoint.interval=2", "stages.grpo.steps=4", "checkpoint.keep_last=2")
    straight = GRPOTrainer(cfg).run()
    root = Path(run_dir, "grpo", "checkpoints")
    corrupt_a_shard(root / "step_00000004")
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        resumed = GRPOTrainer(cfg)
    return {"straight": straight, "start": resumed.start, "second": resumed.run(), "warning": buf.getvalue(),
            "aside": sorted(p.name for p in root.glob(".corrupt.*"))}


@pytest.mark.timeout(600)
def test_corrupt_grpo_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from tests.rl.test_grpo_trainer import TIMING_KEYS

    out = run_ranks(_corrupt_worker, 1, str(tmp_path / "run"))[0]
    assert out["start"].endswith("step_00000002") and out["aside"] == [".corrupt.step_00000004"]
    assert "checksum" in out["warning"] and "falling back" in out["warning"], out["warning"]
    # the iterations redone from step 2 repeat the first run's exactly
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in out["straight"][2:]]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in out["second"]]
