"""A real local Ray head for the launch tests (``ray start --head --block`` on loopback) and job helpers.

The head is started once per session as a child process group of its own; it is stopped with SIGTERM (``ray
start --block`` then stops every Ray process it started) and the test session fails if any process of that
cluster is left behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._dist import free_port
from tests.train._tiny import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

# Token authentication for every Ray cluster, driver and client of the session (RAY_AUTH_MODE=token, the token in
# a file of the session's own): the set-up docs/ray.md recommends for a job API others can reach. Set here, before
# any test module imports ray, because a process reads RAY_AUTH_MODE once.
_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="dsa_ray_auth_"))
RAY_TOKEN = secrets.token_hex(32)
(_TOKEN_DIR / "auth_token").write_text(RAY_TOKEN)
(_TOKEN_DIR / "auth_token").chmod(0o600)
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(_TOKEN_DIR / "auth_token"))
os.environ.pop("RAY_AUTH_TOKEN", None)


def ray_cli() -> str:
    """The `ray` command of this Python environment."""
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def ray_env() -> dict[str, str]:
    """Environment of Ray processes and drivers started by the tests (sources of this checkout first)."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def cluster_pids(port: int) -> list[str]:
    """Processes (``pid cmdline``) whose command line names the GCS port ``port``: what a stopped cluster must
    not leave behind."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f":{port}" in cmd and ("ray" in cmd or "gcs_server" in cmd or "raylet" in cmd):
            out.append(f"{proc.name} {cmd[:200]}")
    return out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class RayHead:
    gcs_address: str  # 127.0.0.1:PORT, for ray.init / cluster.address
    dashboard_url: str  # http://127.0.0.1:PORT, for `ray job submit --address`
    port: int


@pytest.fixture(scope="session")
def ray_token() -> str:
    """The session's Ray token (see the top of this module); its file is removed at the end."""
    yield RAY_TOKEN
    shutil.rmtree(_TOKEN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, ray_token):
    """A Ray head on 127.0.0.1 with 2 CPUs, dashboard + job API; stopped and checked for leftovers at the end."""
    port, dash = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("ray_head") / "ray_start.log", "w")
    cmd = [ray_cli(), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True)
    url = f"http://127.0.0.1:{dash}"

    def job_api_up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{url}/api/jobs/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answers (401: the token is required)
        except OSError:
            return False

    try:
        wait_for(job_api_up, 120, "the Ray head's job API", interval=1.0)
        yield RayHead(f"127.0.0.1:{port}", url, port)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        try:
            wait_for(lambda: not cluster_pids(port), 30, "the Ray head's processes to exit")
        except TimeoutError:
            raise AssertionError(f"Ray processes left behind: {cluster_pids(port)}") from None


@dataclass
class SubmittedJob:
    run_dir: Path
    status: str
    logs: str


@pytest.fixture(scope="session")
def submitted_job(ray_head, tmp_path_factory) -> SubmittedJob:
    """The tiny CP=2 job (dense -> warmup -> sparse) submitted with `ray job submit` and waited for: the
    uninterrupted reference of the restart tests."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir = tmp_path_factory.mktemp("submitted") / "run"
    job_id = f"dsa-test-{os.getpid()}"
    cmd = [ray_cli(), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(REPO),
           "--submission-id", job_id, "--no-wait", "--", sys.executable, "-m", "launch", "configs/tiny.yaml",
           *job_overrides(run_dir)]
    subprocess.run(cmd, check=True, cwd=REPO, env=ray_env(), capture_output=True, timeout=120)
    client = JobSubmissionClient(ray_head.dashboard_url)
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = wait_for(lambda: (s := client.get_job_status(job_id)) in terminal and s, 400, "the job to end",
                      interval=1.0)
    return SubmittedJob(run_dir, str(status), client.get_job_logs(job_id))


def job_overrides(run_dir: Path, **extra: object) -> list[str]:
    """The tiny CP=2 job of the launch tests: seq 64, dense 8 / warmup 3 / sparse 3 steps, checkpoint every 2."""
    job = dict(parallel__cp=2, stages__dense__steps=8, stages__warmup__steps=3, stages__sparse__steps=3,
               optim__warmup_steps=1, checkpoint__interval=2, checkpoint__keep_last=2, cluster__max_restarts=2,
               cluster__restart_backoff_s=0.5, cluster__placement_timeout_s=30)
    return tiny_overrides(run_dir, **(job | extra))


def start_driver(args: list[str], log_path: Path) -> subprocess.Popen:
    """``python -m launch tiny.yaml ARGS`` in the background, output to ``log_path``."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "launch", str(TINY), *args], cwd=REPO, env=ray_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float) -> tuple[int, str]:
    """Wait for a driver; (exit code, its output). A driver still running after ``timeout`` is killed."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"driver did not finish in {timeout:.0f}s:\n{log_path.read_text()[-4000:]}") from None
    return rc, log_path.read_text()


def stage_losses(run_dir: Path, stage: str) -> dict[int, float]:
    """step -> LM loss of ``stage`` from metrics.jsonl (a step logged again after a restart: the newest line)."""
    out: dict[int, float] = {}
    for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "lm_loss" in rec:
            out[rec["step"]] = rec["lm_loss"]
    return out


def rank_pid(run_dir: Path, attempt: int, rank: int) -> dict:
    """Where ``rank`` ran in ``attempt`` (pid, node_id, ip), from <run_dir>/launch/attempt_N.json."""
    path = run_dir / "launch" / f"attempt_{attempt}.json"
    return json.loads(path.read_text())[rank]


def checkpoint_exists(run_dir: Path, stage: str, step: int) -> bool:
    return (run_dir / stage / "checkpoints" / f"step_{step:08d}" / "train_state.json").is_file()
