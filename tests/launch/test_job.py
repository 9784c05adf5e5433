"""`ray job submit` of the tiny CP=2 job on a real local Ray head, and self-healing after a killed or stopped rank.

The reference is the submitted, uninterrupted job (``submitted_job``); a job whose rank is SIGKILLed or SIGSTOPped
mid-stage must finish with the same per-step losses, bitwise (CPU training is deterministic and resumes exactly).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.launch.conftest import (
    checkpoint_exists,
    finish,
    job_overrides,
    rank_pid,
    stage_losses,
    start_driver,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = {"dense": 8, "warmup": 3, "sparse": 3}


def _scalars(event_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_ray_job_submit_runs_every_stage(submitted_job):
    job = submitted_job
    assert job.status == "SUCCEEDED", job.logs[-6000:]
    for stage, steps in STEPS.items():
        assert checkpoint_exists(job.run_dir, stage, steps), f"{stage}: final checkpoint missing"
        losses = stage_losses(job.run_dir, stage)
        assert sorted(losses) == list(range(1, steps + 1))
        tb = _scalars(job.run_dir / stage / "tensorboard", "loss/lm")  # TensorBoard has what metrics.jsonl has
        assert sorted(tb) == sorted(losses)
        assert all(abs(tb[s] - losses[s]) <= 1e-6 * abs(losses[s]) for s in losses)
    # Each rank's lines reach the job log tagged with the rank; rank 0 prints the one-line summaries.
    assert "(rank0 pid=" in job.logs and "(rank1 pid=" in job.logs
    assert "[dense] step 8 | lm " in job.logs
    # The summary table names every stage and the run dir; the rank environment is never printed.
    assert "dsa_dist job summary" in job.logs and f"run dir: {job.run_dir}" in job.logs
    assert "MASTER_PORT" not in job.logs and "WORLD_SIZE" not in job.logs
    dense = stage_losses(job.run_dir, "dense")
    assert dense[8] < dense[1], "the dense stage did not learn"


def _interrupted_run(ray_head, tmp_path: Path, sig: signal.Signals, *extra: str) -> tuple[Path, int, str, dict]:
    """Run the dense stage, send ``sig`` to rank 1 once a mid-stage checkpoint exists; (run dir, rc, log, victim)."""
    run_dir = tmp_path / "run"
    log = tmp_path / "driver.log"
    proc = start_driver(job_overrides(run_dir, pipeline="[dense]", cluster__address=ray_head.gcs_address)
                        + list(extra), log)
    try:
        wait_for(lambda: (run_dir / "launch" / "attempt_0.json").is_file() or proc.poll() is not None, 180,
                 "the workers to start", interval=0.05)
        wait_for(lambda: checkpoint_exists(run_dir, "dense", 2) or proc.poll() is not None, 180,
                 "the first checkpoint", interval=0.02)
        victim = rank_pid(run_dir, 0, 1)
        assert not checkpoint_exists(run_dir, "dense", STEPS["dense"]), "the stage ended before the fault"
        os.kill(victim["pid"], sig)
    except BaseException:
        proc.kill()
        raise
    rc, out = finish(proc, log, timeout=400)
    return run_dir, rc, out, victim


def _assert_resumed_like_reference(run_dir: Path, out: str, reference: Path) -> None:
    assert "Restart 1/2" in out, out[-4000:]
    assert (run_dir / "launch" / "attempt_1.json").is_file()
    # Steps after the checkpoint ran twice; the second time (after the restart) must repeat the reference.
    assert stage_losses(run_dir, "dense") == stage_losses(reference, "dense")


def test_sigkill_of_a_rank_restarts_and_matches_uninterrupted(ray_head, submitted_job, tmp_path):
    run_dir, rc, out, victim = _interrupted_run(ray_head, tmp_path, signal.SIGKILL)
    assert rc == 0, out[-6000:]
    assert "actor died" in out
    _assert_resumed_like_reference(run_dir, out, submitted_job.run_dir)


def test_stopped_rank_times_out_and_restarts(ray_head, submitted_job, tmp_path):
    run_dir, rc, out, victim = _interrupted_run(ray_head, tmp_path, signal.SIGSTOP,
                                                "cluster.collective_timeout_s=20")
    assert rc == 0, out[-6000:]
    assert "a rank raised" in out  # rank 0's collective timed out waiting for the stopped rank
    _assert_resumed_like_reference(run_dir, out, submitted_job.run_dir)
    stat = Path(f"/proc/{victim['pid']}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z", "the stopped rank was not killed"


def test_job_api_requires_the_token(ray_head, ray_token):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code == 401
    req = urllib.request.Request(f"{ray_head.dashboard_url}/api/jobs/",
                                 headers={"Authorization": f"Bearer {ray_token}"})
    with urllib.request.urlopen(req, timeout=10) as ok:
        assert ok.status == 200
