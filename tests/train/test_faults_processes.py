"""Process faults injected into tiny dsa-train runs: kill -9 / SIGTERM (of a run or of the CP launcher) leaves no
process behind, and a stopped rank of a CP=2 run ends the job naming it (docs/fault_tolerance.md "Processes")."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dsa_dist.train.checkpoint import list_checkpoints, verify_checkpoint
from tests._dist import free_port
from tests.train._tiny import tiny_overrides
from tests.train.conftest import leftover_processes

REPO = Path(__file__).resolve().parents[2]


def _cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "dsa_dist.train.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, text: str, deadline_s: float) -> list[str]:
    seen, deadline = [], time.monotonic() + deadline_s
    for line in proc.stdout:
        seen.append(line.rstrip())
        if text in line:
            return seen
        assert time.monotonic() < deadline, seen[-20:]
    raise AssertionError(f"dsa-train ended before printing {text!r}: {seen[-20:]}")


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


_CP2 = dict(parallel__cp=2, parallel__dp=1, train__micro_batch_size=1, train__global_batch_size=2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig,layout", [(signal.SIGKILL, {}), (signal.SIGTERM, {}), (signal.SIGKILL, _CP2)],
                         ids=["kill-9", "sigterm", "cp2-launcher-kill-9"])
def test_killed_run_leaves_no_process(tmp_path, sig, layout):
    before = _descendants()
    proc = _cli(["configs/tiny.yaml", *tiny_overrides(tmp_path / "run", pipeline="[dense]", stages__dense__steps=500,
                                                      checkpoint__interval=1, **layout)])
    try:
        _wait_for(proc, "saved", 240)  # the checkpoint writer (Manager + forked writers) is running now
        _wait_for(proc, "step 2 |", 60)
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(5)
    left = leftover_processes(grace_s=5.0, before=before)
    assert not left, [" ".join(p.cmdline())[:160] for p in left]
    # whatever the moment of the kill, the newest checkpoint is complete and verifies
    verify_checkpoint(list_checkpoints(tmp_path / "run" / "dense" / "checkpoints")[-1])


@pytest.mark.timeout(400)
def test_stopped_rank_ends_the_run_naming_it(tmp_path):
    run = tmp_path / "run"
    before = _descendants()
    timeout_s = 15
    proc = _cli(["configs/tiny.yaml", *tiny_overrides(run, pipeline="[dense]", stages__dense__steps=500,
                                                      parallel__timeout_s=timeout_s, **_CP2)])
    stopped = None
    try:
        _wait_for(proc, "step 2 |", 300)
        stopped = json.loads((run / ".heartbeat" / "rank_00001.json").read_text())["pid"]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=timeout_s + 90)
        elapsed = time.monotonic() - t0
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert f"rank 1 (pid {stopped} on host" in out and "stopped responding" in out, out[-3000:]
    assert "parallel.timeout_s=15" in out
    assert elapsed < timeout_s + 60, elapsed
    time.sleep(5)
    left = leftover_processes(grace_s=5.0, before=before)
    assert not left, [" ".join(p.cmdline())[:160] for p in left]
