"""`ray job submit` of the tiny CP=2 job on a real local Ray head, and self-healing after a killed or stopped rank.

The reference is the submitted, uninterrupted job (``submitted_job``); a job whose rank is SIGKILLed or SIGSTOPped
mid-stage must finish with the same per-step losses, bitwise (CPU training is deterministic and resumes exactly).
"""

from __future__ import annotations

import os
import signal
import sys
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
                                                "parallel.timeout_s=20")
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


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except OSError:
        return False


def _long_run(run_dir: Path) -> list[str]:
    """A dense stage far longer than the test waits: the job is stopped while it trains."""
    return job_overrides(run_dir, pipeline="[dense]", stages__dense__steps=5000, checkpoint__interval=0)


def _rank_pids_once_training(run_dir: Path, running) -> list[int]:
    wait_for(lambda: (run_dir / "dense" / "metrics.jsonl").is_file() or not running(), 240, "training to start")
    assert running(), "the job ended before it was stopped"
    return [rank_pid(run_dir, 0, r)["pid"] for r in (0, 1)]


def test_ray_job_stop_leaves_no_rank_behind(ray_head, tmp_path):
    import subprocess

    from ray.job_submission import JobStatus, JobSubmissionClient

    from tests.launch.conftest import REPO, TINY, ray_cli, ray_env

    run_dir, job_id = tmp_path / "run", f"dsa-stop-{os.getpid()}"
    subprocess.run([ray_cli(), "job", "submit", "--address", ray_head.dashboard_url, "--submission-id", job_id,
                    "--no-wait", "--", sys.executable, "-m", "launch", str(TINY), *_long_run(run_dir)],
                   check=True, cwd=REPO, env=ray_env(), capture_output=True, timeout=120)
    client = JobSubmissionClient(ray_head.dashboard_url)
    pids = _rank_pids_once_training(
        run_dir, lambda: client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING))
    subprocess.run([ray_cli(), "job", "stop", "--address", ray_head.dashboard_url, job_id], check=True,
                   env=ray_env(), capture_output=True, timeout=120)
    wait_for(lambda: client.get_job_status(job_id) == JobStatus.STOPPED, 60, "the job to stop")
    wait_for(lambda: not any(_alive(p) for p in pids), 30, "every rank to exit")
    assert "every worker was killed" in client.get_job_logs(job_id)


def test_ctrl_c_of_the_driver_leaves_no_rank_behind(ray_head, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    proc = start_driver(_long_run(run_dir) + [f"cluster.address={ray_head.gcs_address}"], log)
    try:
        pids = _rank_pids_once_training(run_dir, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
    except BaseException:
        proc.kill()
        raise
    rc, out = finish(proc, log, timeout=60)
    assert rc == 130, out[-4000:]
    wait_for(lambda: not any(_alive(p) for p in pids), 30, "every rank to exit")


def test_restarts_spent_fails_cleanly_and_keeps_the_checkpoints(ray_head, tmp_path):
    run_dir, rc, out, _ = _interrupted_run(ray_head, tmp_path, signal.SIGKILL, "cluster.max_restarts=0")
    assert rc == 1, out[-4000:]
    failure = next(line for line in out.splitlines() if line.startswith("launch: job failed:"))
    assert "actor died" in failure and "cluster.max_restarts=0 restart(s) spent" in failure
    assert checkpoint_exists(run_dir, "dense", 2)


def test_a_job_asking_for_gpus_the_cluster_lacks_fails_in_seconds(ray_head, tmp_path):
    import time

    log = tmp_path / "driver.log"
    proc = start_driver(job_overrides(tmp_path / "run", cluster__address=ray_head.gcs_address,
                                      cluster__accelerator="gpu", cluster__placement_timeout_s=600), log)
    wait_for(lambda: "[launch] connected" in log.read_text() or proc.poll() is not None, 120, "the driver")
    connected = time.monotonic()
    rc, out = finish(proc, log, timeout=120)
    assert rc == 1, out[-4000:]
    assert "the cluster has 0 GPU in 1 alive node(s), the job needs 2 GPU" in out
    assert time.monotonic() - connected < 20  # not the 600 s placement timeout: the check does not wait
    assert not (tmp_path / "run" / "launch").exists()  # no rank was started
