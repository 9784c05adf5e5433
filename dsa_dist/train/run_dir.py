"""The run directory: one run at a time, and a fresh start never mixes with an old run (docs/fault_tolerance.md).

- :class:`RunDirLock` — an exclusive ``fcntl.flock`` on ``<run_dir>/.lock``, taken by rank 0 before anything is
  written. The file records the holder (pid, host, start time). A second run into the same directory fails at
  once naming the holder. The kernel drops a flock when its process dies, however it dies, so the lock of a
  dead run is simply taken over (the old holder is named in the log). On network file systems flock may be
  local to a host: do not run two jobs into one run_dir from different hosts.
- :func:`check_fresh_start` — with ``checkpoint.resume=false`` a run dir that already holds checkpoints of a
  stage to be run is refused (``checkpoint.on_existing=error``, the default), or the old stage directories are
  renamed to ``<stage>.old-<UTC time>`` (``on_existing=move_aside``); nothing is ever deleted.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dsa_dist.train.checkpoint import list_checkpoints
from dsa_dist.train.errors import RunDirError

LOCK_FILE = ".lock"


class RunDirLock:
    """Exclusive lock of a run directory by this process (``acquire`` / ``release``, or a context manager)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self.previous_holder: dict | None = None
        """The record of a dead run whose lock was taken over (None if the lock was free and unrecorded)."""

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"
                   if holder else "another process")
            raise RunDirError(f"run_dir {self.path.parent} is in use by {who}: two runs must not write into one "
                              "run directory. Wait for that run to end (or stop it), or choose another "
                              "run_dir") from None
        self.previous_holder = _read_record(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty record: the directory was released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_record(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def check_fresh_start(run_dir: str | Path, stages: list[str], on_existing: str) -> list[str]:
    """For ``checkpoint.resume=false``: refuse a run dir holding checkpoints of ``stages``, or move them aside.

    Returns log lines describing what was moved. Raises :class:`RunDirError` with ``on_existing='error'``.
    """
    run_dir = Path(run_dir)
    existing = {s: list_checkpoints(run_dir / s / "checkpoints") for s in stages}
    existing = {s: c for s, c in existing.items() if c}
    if not existing:
        return []
    if on_existing != "move_aside":
        found = ", ".join(f"{s}: {c[-1].name}" for s, c in existing.items())
        raise RunDirError(
            f"run_dir {run_dir} already holds checkpoints ({found}) and checkpoint.resume=false: a fresh run "
            "there would mix with the old one. Set checkpoint.resume=true to continue it, choose another run_dir, "
            "or set checkpoint.on_existing=move_aside to keep the old stages under <stage>.old-<time>")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    lines = []
    for stage in existing:
        target = run_dir / f"{stage}.old-{stamp}"
        os.replace(run_dir / stage, target)
        lines.append(f"[{stage}] checkpoint.resume=false: moved the old stage directory aside to {target}")
    return lines
