"""The ``dsa-train`` entry point end to end: stages chained through checkpoints, the run directory, TensorBoard
scalars, automatic resume (a finished run is not trained again), and self-spawned context-parallel ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests._dist import free_port
from tests.train._tiny import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCALARS = ["loss/lm", "loss/indexer_kl", "loss/total", "optim/grad_norm", "perf/tokens_per_s", "perf/tflops",
                 "perf/peak_memory_gb"]


def _dsa_train(args: list[str]) -> str:
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "dsa_dist.train.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_dsa_train_stages_tensorboard_and_resume(tmp_path):
    run = tmp_path / "run"
    args = ["configs/tiny.yaml", *tiny_overrides(run, stages__dense__steps=4, stages__warmup__steps=3,
                                                 stages__sparse__steps=3, optim__warmup_steps=1,
                                                 data__eval_tasks="[assoc]", data__eval_samples=2,
                                                 logging__recall="true", logging__progress="rich",
                                                 parallel__cp=2, parallel__dp=1, train__global_batch_size=2,
                                                 train__micro_batch_size=1)]
    out = _dsa_train(args)
    assert "starting 2 local processes" in out and "done: dense, warmup, sparse" in out

    # run-dir layout
    assert (run / "config.yaml").is_file()
    for stage, steps in (("dense", 4), ("warmup", 3), ("sparse", 3)):
        ckpts = sorted(p.name for p in (run / stage / "checkpoints").iterdir())
        assert ckpts == [f"step_{steps:08d}"], ckpts
        records = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "lm_loss" in r] == list(range(1, steps + 1))
        assert any("eval/assoc_acc" in r for r in records)
        scalars = _scalars(run / stage / "tensorboard")
        expected = TRAIN_SCALARS + ["indexer/recall", "eval/assoc_acc", "eval/assoc_answer_loss"]
        expected += ["optim/indexer_lr"] if stage != "dense" else []
        expected += ["optim/lr"] if stage != "warmup" else []
        missing = [t for t in expected if t not in scalars]
        assert not missing, (stage, missing, sorted(scalars))
        assert [s for s, _ in scalars["loss/lm"]] == list(range(1, steps + 1))
        lm = {r["step"]: r["lm_loss"] for r in records if "lm_loss" in r}
        assert all(abs(v - lm[s]) < 1e-5 * max(1.0, abs(v)) for s, v in scalars["loss/lm"])
    assert "initialised from" in out and str(run / "dense" / "checkpoints" / "step_00000004") in out

    # A second invocation (CP=1 now) finds every stage finished: nothing is trained or written again.
    bookkeeping = ("config.yaml", ".lock")  # rewritten by every invocation (the resolved config, the lock holder)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name not in bookkeeping}
    out2 = _dsa_train(args[:1] + [a for a in args[1:] if not a.startswith(("parallel.", "train."))])
    assert "step 1 |" not in out2 and "done: dense, warmup, sparse" in out2
    assert out2.count("already complete") == 3
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name not in bookkeeping}
    assert after == before


def test_dsa_train_reports_config_errors(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "dsa_dist.train.cli", "configs/tiny.yaml", "train.stepz=3",
                           f"run_dir={tmp_path}"], cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 2 and "unknown config key 'train.stepz'" in proc.stderr
