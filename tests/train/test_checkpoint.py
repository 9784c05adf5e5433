"""Checkpoints (dsa_dist/train/checkpoint.py, checkpoint_manager.py, trainer.py): exact resume, resharding, crash
safety, clear errors."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dsa_dist.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, read_train_state
from tests.train._tiny import held_out_batches, run_ranks, tiny_config

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------ exact resume


def _resume_worker(rank: int, world_size: int, run_a: str, run_b: str, n: int) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.trainer import StageTrainer

    # The sparse stage from scratch: LM + KL losses, two LR groups, a task mix, recall on log steps.
    extra = dict(pipeline="[sparse]", stages__sparse__steps=2 * n, stages__sparse__warmup_steps=2,
                 data__task_fraction=0.5, data__tasks="[assoc]", logging__recall="true", logging__log_interval=3,
                 checkpoint__interval=2, checkpoint__keep_last=2)
    init_parallel(1, 1)
    straight = StageTrainer(tiny_config(run_a, **extra), "sparse").run()
    first = StageTrainer(tiny_config(run_b, **extra), "sparse").run(until=n)  # stop (and save) at step n
    resumed = StageTrainer(tiny_config(run_b, **extra), "sparse")  # a new trainer: resumes from the latest
    return {"straight": straight, "first": first, "resumed_step": resumed.step, "second": resumed.run()}


def test_resume_is_bitwise_identical(tmp_path):
    n = 4
    out = run_ranks(_resume_worker, 1, str(tmp_path / "a"), str(tmp_path / "b"), n)[0]
    assert out["resumed_step"] == n
    joined = out["first"] + out["second"]
    assert [r["step"] for r in joined] == list(range(1, 2 * n + 1))
    for key in ("loss", "lm_loss", "indexer_kl", "grad_norm", "lr", "indexer_lr", "data"):
        assert [r[key] for r in joined] == [r[key] for r in out["straight"]], key  # exact equality, same data
    assert any(r["indexer_recall"] is not None for r in joined)
    # The sparse KL's value comes from the attention backward (fused): it is reported, not the proxy's 0.
    assert all(math.isfinite(r["indexer_kl"]) and r["indexer_kl"] > 0 for r in joined)
    # keep_last=2: steps 6 and 8 remain
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "sparse" / "checkpoints")] == \
        ["step_00000006", "step_00000008"]
    state = read_train_state(tmp_path / "b" / "sparse" / "checkpoints" / "step_00000008")
    assert state["step"] == 8 and state["stage"] == "sparse" and state["consumed_samples"] == 8 * 4


# ------------------------------------------------------------------------------------------------ resharding
_LAYOUTS = {"cp1": dict(), "tp2": dict(parallel__tp=2, parallel__dp=1), "dp2": dict(parallel__dp=2)}
_STEPS = 4


def _reshard_cfg(run_dir: str, world: int, **layout):
    return tiny_config(run_dir, world_size=world, pipeline="[sparse]", stages__sparse__steps=_STEPS,
                       stages__sparse__warmup_steps=1, **layout)


def _reshard_save_worker(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist

    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.trainer import StageTrainer

    cfg = _reshard_cfg(f"{root}/cp2", 2, parallel__cp=2, parallel__dp=1)
    init_parallel(1, 2)
    trainer = StageTrainer(cfg, "sparse")
    trainer.run(until=2)  # checkpoint at step 2
    if rank == 0:  # give every target layout its own run dir holding the step-2 checkpoint
        for name in _LAYOUTS:
            shutil.copytree(f"{root}/cp2/sparse/checkpoints/step_00000002",
                            f"{root}/{name}/sparse/checkpoints/step_00000002")
    dist.barrier()
    at_save = trainer.eval_loss(held_out_batches(trainer))
    return {"eval": at_save, "history": trainer.run()}  # steps 3..4 continue from the in-memory state


def _reshard_load_worker(rank: int, world_size: int, root: str, names: list[str]) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.trainer import StageTrainer

    out = {}
    for name in names:
        cfg = _reshard_cfg(f"{root}/{name}", world_size, **_LAYOUTS[name])
        init_parallel(cfg.parallel.tp, cfg.parallel.cp)
        trainer = StageTrainer(cfg, "sparse")  # resumes from the CP=2 checkpoint
        out[name] = {"step": trainer.step, "eval": trainer.eval_loss(held_out_batches(trainer)),
                     "history": trainer.run()}
    return out


def test_checkpoint_reshards_across_cp_tp_dp(tmp_path):
    saved = run_ranks(_reshard_save_worker, 2, str(tmp_path))[0]
    loaded = run_ranks(_reshard_load_worker, 1, str(tmp_path), ["cp1"])[0]
    loaded |= run_ranks(_reshard_load_worker, 2, str(tmp_path), ["tp2", "dp2"])[0]
    for name, got in loaded.items():
        assert got["step"] == 2, name
        # model weights: the same loss on the same batches
        for key in ("lm_loss", "indexer_kl"):
            assert got["eval"][key] == pytest.approx(saved["eval"][key], rel=1e-5, abs=1e-7), (name, key)
        # optimizer state + data position: the next steps see the same data and make the same updates
        if name != "dp2":  # (a DP=2 rank sees half of each global batch)
            assert [r["data"] for r in got["history"]] == [r["data"] for r in saved["history"]]
        for a, b in zip(got["history"], saved["history"]):
            assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-4), (name, a["step"])
            assert a["indexer_kl"] == pytest.approx(b["indexer_kl"], rel=1e-3, abs=1e-6), (name, a["step"])


# ------------------------------------------------------------------------------------------------ crash safety


def fake_state(step: int, n: int = 1 << 21) -> dict:
    """A sharded state dict whose tensors all hold ``step`` (so a loaded checkpoint tells which save it is)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", torch.full((n,), float(step))) for i in range(4)}


_SAVER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from megatron.core import dist_checkpointing
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.checkpoint import save_checkpoint
    from tests.train.test_checkpoint import fake_state

    if __name__ == "__main__":
        init_parallel(1, 1)
        real_save = dist_checkpointing.save
        def save_then_maybe_hang(state, path, **kw):
            real_save(state, path, **kw)
            print("shards written", flush=True)
            if os.environ.get("HANG_AFTER_SHARDS") and "step_00000003" in path:
                time.sleep(600)  # killed here: shards on disk, not yet published
        dist_checkpointing.save = save_then_maybe_hang
        for step in range(1, 100):
            print(f"saving {{step}}", flush=True)
            save_checkpoint({root!r}, step, fake_state(step), {{"step": step, "stage": "t", "consumed_samples": 0,
                            "layout": {{}}}}, keep_last=2)
            print(f"saved {{step}}", flush=True)
""")


def _kill_during_save(root: Path, hang: bool, delay: float) -> None:
    script = root.parent / "saver.py"
    script.write_text(_SAVER.format(repo=str(REPO), root=str(root)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="1", RANK="0",
               OMP_NUM_THREADS="1")
    if hang:
        env["HANG_AFTER_SHARDS"] = "1"
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=str(REPO))
    target = "shards written" if hang else "saving 3"
    seen = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            seen.append(line.strip())
            if seen[-1] == target and ("saving 3" in seen or not hang):
                break
            assert time.monotonic() < deadline, seen
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "saved 2" in seen, seen


def _free_port() -> int:
    from tests._dist import free_port

    return free_port()


def _load_worker(rank: int, world_size: int, path: str) -> float:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.checkpoint import load_checkpoint

    init_parallel(1, 1)
    state = load_checkpoint(path, fake_state(0))
    values = torch.stack([state[k] for k in sorted(state)])
    assert bool((values == values.flatten()[0]).all())
    return float(values.flatten()[0])


@pytest.mark.parametrize("hang,delay", [(True, 0.0), (False, 0.05)], ids=["after-shards", "while-writing"])
def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, hang, delay):
    root = tmp_path / "ckpts"
    _kill_during_save(root, hang, delay)
    complete = list_checkpoints(root)
    latest = latest_checkpoint(root)
    assert latest is not None and latest.name in ("step_00000002", "step_00000003")
    if hang:  # killed between writing the shards and publishing them: step 3 must not be visible
        assert latest.name == "step_00000002" and (root / ".tmp.step_00000003").is_dir()
    assert len(complete) <= 2
    assert run_ranks(_load_worker, 1, str(latest))[0] == float(latest.name.split("_")[1])


def test_corrupted_or_missing_checkpoints_give_clear_errors(tmp_path):
    root = tmp_path / "ckpts"
    _kill_during_save(root, hang=True, delay=0.0)
    good = root / "step_00000002"
    with pytest.raises(CheckpointError, match="does not exist"):
        read_train_state(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a directory"):
        (tmp_path / "file").write_text("x")
        read_train_state(tmp_path / "file")
    with pytest.raises(CheckpointError, match="incomplete.*train_state.json"):
        read_train_state(root / ".tmp.step_00000003")  # the interrupted save
    no_meta = shutil.copytree(good, tmp_path / "no_meta")
    (no_meta / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"corrupted: missing \['\.metadata'\]"):
        read_train_state(no_meta)
    bad_json = shutil.copytree(good, tmp_path / "bad_json")
    (bad_json / "train_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted.*unreadable"):
        read_train_state(bad_json)
    truncated = shutil.copytree(good, tmp_path / "truncated")
    for shard in truncated.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    broken = r"(?s)CheckpointError: checkpoint .*truncated could not be loaded \(.*\)\. It is corrupted"
    with pytest.raises(RuntimeError, match=broken):
        run_ranks(_load_worker, 1, str(truncated))
    assert run_ranks(_load_worker, 1, str(good))[0] == 2.0
