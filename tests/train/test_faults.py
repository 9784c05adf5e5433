"""Faults injected into tiny runs: each one must end cleanly and never lose or corrupt a run (docs/fault_tolerance.md).

Every test runs the tiny config for a few steps (64-token sequences) or saves a small fake state, and injects one
fault: an existing run under resume=false, a save over an existing or a lost checkpoint, a second run into a
locked run dir, a NaN step, a huge-LR divergence, a corrupt shard, a full disk, a kill during cleanup, a changed
schedule or stage lineage on resume. Runs use ``run_ranks`` (forked workers); process faults (kills, a stopped
rank) are in test_faults_processes.py.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsa_dist.train.checkpoint import list_checkpoints, read_train_state, verify_checkpoint
from tests.train._tiny import corrupt_a_shard, run_ranks, tiny_config

REPO = Path(__file__).resolve().parents[2]
DENSE = dict(pipeline="[dense]", stages__dense__steps=4, optim__warmup_steps=1)


def _run(fn, *args, timeout: float = 300.0):
    return run_ranks(fn, 1, *args, timeout=timeout)[0]


def _pipeline_outcome(cfg) -> dict:
    """run_pipeline(cfg) -> {"error": message or None, "out": stdout+stderr, "seconds": wall time}."""
    from dsa_dist.train.errors import TrainingError
    from dsa_dist.train.pipeline import run_pipeline

    buf, t0, error = io.StringIO(), time.monotonic(), None
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            run_pipeline(cfg)
        except TrainingError as err:
            error = f"{type(err).__name__}: {err}"
    return {"error": error, "out": buf.getvalue(), "seconds": time.monotonic() - t0}


# ------------------------------------------------------------------------------------------------ B1 fresh start


def _fresh_start_worker(rank: int, world_size: int, run_dir: str) -> dict:
    first = _pipeline_outcome(tiny_config(run_dir, **DENSE))
    before = {p.name: p.stat().st_mtime_ns for p in Path(run_dir, "dense", "checkpoints").rglob("*")}
    refused = _pipeline_outcome(tiny_config(run_dir, checkpoint__resume="false", **DENSE))
    after = {p.name: p.stat().st_mtime_ns for p in Path(run_dir, "dense", "checkpoints").rglob("*")}
    moved = _pipeline_outcome(tiny_config(run_dir, checkpoint__resume="false", checkpoint__on_existing="move_aside",
                                          **DENSE))
    return {"first": first, "refused": refused, "untouched": before == after, "moved": moved}


@pytest.mark.timeout(300)
def test_resume_false_on_existing_run_is_refused_or_moved_aside(tmp_path):
    run = tmp_path / "run"
    out = _run(_fresh_start_worker, str(run))
    assert out["first"]["error"] is None
    err = out["refused"]["error"]
    assert err and "RunDirError" in err and "already holds checkpoints" in err and "step_00000004" in err, err
    assert "checkpoint.on_existing=move_aside" in err
    assert out["untouched"]  # the old run is not touched by the refused start
    assert out["moved"]["error"] is None
    old = [p for p in run.iterdir() if p.name.startswith("dense.old-")]
    assert len(old) == 1 and "moved the old stage directory aside" in out["moved"]["out"]
    verify_checkpoint(old[0] / "checkpoints" / "step_00000004")  # the old run is kept intact
    assert [p.name for p in list_checkpoints(run / "dense" / "checkpoints")] == ["step_00000004"]


def _save_twice_worker(rank: int, world_size: int, root: str) -> str:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.checkpoint import CheckpointError, save_checkpoint
    from tests.train.test_checkpoint import fake_state

    init_parallel(1, 1)
    state = {"step": 1, "stage": "t", "consumed_samples": 0, "layout": {}}
    save_checkpoint(root, 1, fake_state(1, 1 << 10), state, keep_last=2)
    try:
        save_checkpoint(root, 1, fake_state(7, 1 << 10), state, keep_last=2)
    except CheckpointError as err:
        return str(err)
    return "saved twice"


@pytest.mark.timeout(120)
def test_save_never_replaces_an_existing_checkpoint(tmp_path):
    msg = _run(_save_twice_worker, str(tmp_path / "c"))
    assert "refusing to save step 1" in msg and "exists already" in msg, msg
    assert not list((tmp_path / "c").glob(".tmp.*"))
    assert _run(_load_value_worker, str(tmp_path / "c" / "step_00000001")) == 1.0  # the first save's data


def _load_value_worker(rank: int, world_size: int, path: str) -> float:
    """The value every tensor of a ``fake_state(step, 1 << 10)`` checkpoint holds (they are all equal)."""
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.checkpoint import load_checkpoint
    from tests.train.test_checkpoint import fake_state

    init_parallel(1, 1)
    state = load_checkpoint(path, fake_state(0, 1 << 10))
    values = torch.stack([state[k] for k in sorted(state)])
    assert bool((values == values.flatten()[0]).all())
    return float(values.flatten()[0])


def _lossy_fs_worker(rank: int, world_size: int, root: str) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train import checkpoint as ckpt
    from tests.train.test_checkpoint import fake_state

    init_parallel(1, 1)
    state = {"stage": "t", "consumed_samples": 0, "layout": {}}
    ckpt.save_checkpoint(root, 1, fake_state(1, 1 << 10), dict(state, step=1), keep_last=1)
    real_replace = ckpt.os.replace

    def publish_and_lose_a_shard(src, dst):  # a file system that drops data at the rename
        real_replace(src, dst)
        if Path(dst).name == "step_00000002":
            next(Path(dst).glob("*.distcp")).unlink()

    ckpt.os.replace = publish_and_lose_a_shard
    try:
        ckpt.save_checkpoint(root, 2, fake_state(2, 1 << 10), dict(state, step=2), keep_last=1)
        return {"error": None}
    except ckpt.CheckpointError as err:
        return {"error": str(err), "listed": [p.name for p in ckpt.list_checkpoints(root)]}
    finally:
        ckpt.os.replace = real_replace


@pytest.mark.timeout(120)
def test_save_reports_failure_when_the_published_checkpoint_does_not_verify(tmp_path):
    out = _run(_lossy_fs_worker, str(tmp_path / "c"))
    assert out["error"] and "failed verification right after the save" in out["error"], out
    assert out["listed"] == ["step_00000001"]  # the broken one is moved aside; keep_last deleted nothing
    assert (tmp_path / "c" / ".corrupt.step_00000002").is_dir()
    verify_checkpoint(tmp_path / "c" / "step_00000001")


# ------------------------------------------------------------------------------------------------ B2 lock


def _locked_worker(rank: int, world_size: int, run_dir: str) -> dict:
    return _pipeline_outcome(tiny_config(run_dir, **DENSE))


@pytest.mark.timeout(300)
def test_second_run_into_a_locked_run_dir_fails_at_once(tmp_path):
    from dsa_dist.train.run_dir import RunDirLock

    run = tmp_path / "run"
    with RunDirLock(run):  # this process "is" the first run
        out = _run(_locked_worker, str(run))
    assert out["error"] and "RunDirError" in out["error"], out
    assert f"in use by pid {os.getpid()}" in out["error"]
    assert out["seconds"] < 20, out["seconds"]  # at once: before any model is built
    assert not (run / "dense").exists()


@pytest.mark.timeout(300)
def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dsa_dist.train.run_dir import RunDirLock; "
                               f"RunDirLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # the dead run's record is still there
    out = _run(_locked_worker, str(run))
    assert out["error"] is None, out
    assert f"took over the lock of {run} from pid {holder.pid}" in out["out"]
    assert (run / ".lock").read_text() == ""  # released at the end


# ------------------------------------------------------------------------------------------------ B4 non-finite


def _nan_at(trainer, steps: set[int]) -> None:
    """Make the model's output NaN during the given (0-based) steps: loss and all gradients become NaN."""
    trainer.gpt.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step in steps else out)


def _skip_worker(rank: int, world_size: int, run_dir: str) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.trainer import StageTrainer

    init_parallel(1, 1)
    trainer = StageTrainer(tiny_config(run_dir, **DENSE), "dense")
    snaps: dict[int, list[torch.Tensor]] = {}

    def snapshot(module, inputs) -> None:  # parameters at the start of each step (before its update)
        if trainer.step not in snaps:
            snaps[trainer.step] = [p.detach().clone() for p in trainer.gpt.parameters()]

    trainer.gpt.register_forward_pre_hook(snapshot)
    _nan_at(trainer, {2})  # the third step
    history = trainer.run()
    unchanged = all(torch.equal(a, b) for a, b in zip(snaps[2], snaps[3]))
    changed_before = not all(torch.equal(a, b) for a, b in zip(snaps[1], snaps[2]))
    final = read_train_state(list_checkpoints(Path(run_dir, "dense", "checkpoints"))[-1])
    return {"history": history, "unchanged": unchanged, "changed_before": changed_before, "final": final,
            "finite": all(bool(torch.isfinite(p).all()) for p in trainer.gpt.parameters())}


@pytest.mark.timeout(300)
def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    out = _run(_skip_worker, str(tmp_path / "run"))
    hist = out["history"]
    assert [r["skipped"] for r in hist] == [False, False, True, False]
    assert out["unchanged"] and out["changed_before"]  # the NaN step changed no parameter; normal steps do
    assert hist[2]["lr"] == hist[1]["lr"]  # ... nor the LR schedule
    assert all(r["grad_norm"] == r["grad_norm"] for i, r in enumerate(hist) if i != 2)
    assert out["finite"] and out["final"]["skipped_steps"] == 1
    records = [json.loads(x) for x in (tmp_path / "run" / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["step"] == 4 and "lm_loss" in r] == [1]
    from tests.train.test_cli_metrics import _scalars

    assert (3, 1.0) in _scalars(tmp_path / "run" / "dense" / "tensorboard")["train/skipped_steps"]


def _diverge_worker(rank: int, world_size: int, run_dir: str) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.errors import NonFiniteError
    from dsa_dist.train.trainer import StageTrainer

    init_parallel(1, 1)
    cfg = tiny_config(run_dir, pipeline="[dense]", stages__dense__steps=20, optim__warmup_steps=0, optim__lr=1e30,
                      optim__min_lr=1e30, optim__clip_grad=0.0, checkpoint__interval=1, train__max_nonfinite_steps=3)
    trainer = StageTrainer(cfg, "dense")
    out: dict = {}
    try:
        trainer.run()
    except NonFiniteError as err:
        out["error"] = str(err)
    out["step"] = trainer.step
    saved = list_checkpoints(Path(run_dir, "dense", "checkpoints"))
    # Inject non-finite weights directly: a save must refuse them.
    with torch.no_grad():
        next(trainer.gpt.parameters()).fill_(float("inf"))
    trainer.step += 1
    try:
        trainer.save()
    except NonFiniteError as err:
        out["save_error"] = str(err)
    out["saved_after"] = [p.name for p in list_checkpoints(Path(run_dir, "dense", "checkpoints"))]
    out["saved"] = [p.name for p in saved]
    return out


def _checkpoint_finite_worker(rank: int, world_size: int, run_dir: str, name: str) -> bool:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.trainer import StageTrainer

    init_parallel(1, 1)
    cfg = tiny_config(run_dir, pipeline="[dense]", stages__dense__steps=20, optim__warmup_steps=0)
    trainer = StageTrainer(cfg, "dense")
    trainer.checkpoints.restore(trainer.parts, Path(run_dir, "dense", "checkpoints", name), full=False,
                                layout=trainer.layout(), seed=0)
    return all(bool(torch.isfinite(p).all()) for p in trainer.gpt.parameters())


@pytest.mark.timeout(300)
def test_divergence_stops_with_a_clear_error_and_saves_only_finite_weights(tmp_path):
    run = tmp_path / "run"
    out = _run(_diverge_worker, str(run))
    assert "training diverged: 3 steps in a row" in out.get("error", ""), out
    assert out["step"] < 20
    assert "refusing to save" in out.get("save_error", "") and out["saved_after"] == out["saved"]
    assert not list((run / "dense" / "checkpoints").glob(".tmp.*"))
    for name in out["saved"]:
        assert _run(_checkpoint_finite_worker, str(run), name), name


def _corrupt_worker(rank: int, world_size: int, run_dir: str) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.trainer import StageTrainer

    init_parallel(1, 1)
    cfg = tiny_config(run_dir, **DENSE, checkpoint__interval=2, checkpoint__keep_last=2)
    straight = StageTrainer(cfg, "dense").run()
    root = Path(run_dir, "dense", "checkpoints")
    corrupt_a_shard(root / "step_00000004")
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        resumed = StageTrainer(cfg, "dense")
    step = resumed.step
    second = resumed.run()
    return {"straight": straight, "step": step, "second": second, "warning": buf.getvalue(),
            "after": [p.name for p in list_checkpoints(root)], "aside": sorted(p.name for p in root.glob(".corrupt.*"))}


@pytest.mark.timeout(300)
def test_corrupt_shard_falls_back_to_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    out = _run(_corrupt_worker, str(run))
    assert out["step"] == 2, out["warning"]
    assert "checksum of" in out["warning"] and "falling back to the previous checkpoint" in out["warning"]
    assert out["aside"] == [".corrupt.step_00000004"]
    # the resumed steps 3-4 repeat the uninterrupted run exactly: it really resumed from the good step 2
    assert [r["lm_loss"] for r in out["second"]] == [r["lm_loss"] for r in out["straight"][2:]]
    assert out["after"] == ["step_00000002", "step_00000004"]  # keep_last kept the good one until a new one exists
    for name in out["after"]:
        verify_checkpoint(run / "dense" / "checkpoints" / name)


# ------------------------------------------------------------------------------------------------ B8 disk, delete


def _enospc_worker(rank: int, world_size: int, root: str) -> dict:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.checkpoint import CheckpointError, save_checkpoint
    from tests.train.test_checkpoint import fake_state

    init_parallel(1, 1)
    state = {"step": 1, "stage": "t", "consumed_samples": 0, "layout": {}}
    save_checkpoint(root, 1, fake_state(1, 1 << 10), state, keep_last=1)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    filesystem_async._write_item = disk_full  # inherited by the forked writer processes
    try:
        save_checkpoint(root, 2, fake_state(2, 1 << 10), dict(state, step=2), keep_last=1)
    except CheckpointError as err:
        return {"error": str(err)}
    return {"error": None}


@pytest.mark.timeout(120)
def test_disk_full_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "c"
    out = _run(_enospc_worker, str(root))
    assert out["error"] and "ENOSPC" in out["error"] and str(root / ".tmp.step_00000002") in out["error"], out
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001"]
    assert not list(root.glob(".tmp.*"))
    verify_checkpoint(root / "step_00000001")
    assert _run(_load_value_worker, str(root / "step_00000001")) == 1.0


def _killed_cleanup_worker(rank: int, world_size: int, root: str) -> list[str]:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train import checkpoint as ckpt
    from tests.train.test_checkpoint import fake_state

    init_parallel(1, 1)
    state = {"stage": "t", "consumed_samples": 0, "layout": {}}
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, fake_state(step, 1 << 12), dict(state, step=step), keep_last=2)
    real_rmtree = ckpt.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # a kill after the first file of the old checkpoint is gone
        if Path(path).name.startswith(ckpt.DELETING_PREFIX):
            next(Path(path).glob("*.distcp")).unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    ckpt.shutil.rmtree = killed_midway
    try:
        ckpt.save_checkpoint(root, 3, fake_state(3, 1 << 12), dict(state, step=3), keep_last=2)
    except KeyboardInterrupt:
        pass
    ckpt.shutil.rmtree = real_rmtree
    listed = [p.name for p in ckpt.list_checkpoints(root)]
    for p in ckpt.list_checkpoints(root):
        ckpt.verify_checkpoint(p)
    ckpt.save_checkpoint(root, 4, fake_state(4, 1 << 12), dict(state, step=4), keep_last=2)  # cleans the rest
    return listed + sorted(p.name for p in Path(root).iterdir())


@pytest.mark.timeout(120)
def test_kill_during_cleanup_never_leaves_a_partial_checkpoint(tmp_path):
    out = _run(_killed_cleanup_worker, str(tmp_path / "c"))
    assert out == ["step_00000002", "step_00000003", "step_00000003", "step_00000004"], out


# ------------------------------------------------------------------------------------------------ B5 resume


def _schedule_worker(rank: int, world_size: int, run_a: str, run_b: str) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.trainer import StageTrainer

    init_parallel(1, 1)
    short = dict(DENSE, stages__dense__steps=4, optim__lr=3e-3, optim__min_lr=3e-4)
    longer = dict(DENSE, stages__dense__steps=8, optim__lr=1e-3, optim__min_lr=1e-4)
    StageTrainer(tiny_config(run_a, **short), "dense").run()  # a finished 4-step stage
    extended = StageTrainer(tiny_config(run_a, **longer), "dense")  # extended to 8 steps, new lr
    return {"step": extended.step, "notes": extended.notes, "extended": extended.run(),
            "straight": StageTrainer(tiny_config(run_b, **longer), "dense").run()}


@pytest.mark.timeout(300)
def test_resume_applies_the_changed_lr_schedule_from_the_current_step(tmp_path):
    out = _run(_schedule_worker, str(tmp_path / "a"), str(tmp_path / "b"))
    assert out["step"] == 4
    assert any("lr 0.003 -> 0.001" in n and "steps 4 -> 8" in n and "applies from step 4" in n for n in out["notes"])
    # steps 5..8 follow the new 8-step schedule exactly as a run configured so from the start
    assert [r["lr"] for r in out["extended"]] == [r["lr"] for r in out["straight"][4:]]
    assert out["extended"][0]["lr"] > 2e-4  # not stuck at the old min_lr (3e-4 -> the new 1e-4 only at the end)


def _lineage_worker(rank: int, world_size: int, run_dir: str) -> dict:
    two = dict(stages__dense__steps=2, stages__warmup__steps=2, optim__warmup_steps=1)
    first = _pipeline_outcome(tiny_config(run_dir, pipeline="[dense,warmup]", **two))
    extended = _pipeline_outcome(tiny_config(run_dir, pipeline="[dense,warmup]", **dict(two, stages__dense__steps=3)))
    return {"first": first, "extended": extended}


@pytest.mark.timeout(300)
def test_stage_lineage_is_recorded_and_checked_on_resume(tmp_path):
    run = tmp_path / "run"
    out = _run(_lineage_worker, str(run))
    assert out["first"]["error"] is None, out["first"]
    lineage = read_train_state(run / "warmup" / "checkpoints" / "step_00000002")["lineage"]
    assert lineage["init_from"] == str(run / "dense" / "checkpoints" / "step_00000002") and lineage["step"] == 2
    err = out["extended"]["error"]  # dense went on to step 3: warmup's checkpoint descends from dense step 2
    assert err and "cannot resume stage 'warmup'" in err and "dense step 2" in err and "dense step 3" in err, err
