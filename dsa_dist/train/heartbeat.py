"""Per-rank heartbeats, to name the rank that stopped when a collective times out (docs/fault_tolerance.md).

Each rank runs a daemon thread that rewrites ``<run_dir>/.heartbeat/rank_<r>.json`` (pid, host, step, time)
every ``interval`` seconds. A rank blocked in a collective keeps beating (the wait releases the GIL); a rank
that is stopped (SIGSTOP, a hung node, a kernel stall) or dead does not. When a collective times out
(``parallel.timeout_s``), :func:`stale_ranks` reads the files and names the ranks whose heartbeat is old.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT_DIR = ".heartbeat"


def heartbeat_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"rank_{rank:05d}.json"


class Heartbeat:
    """A daemon thread writing this rank's heartbeat file; ``step`` is updated by the trainer."""

    def __init__(self, run_dir: str | Path, rank: int, interval: float = 1.0) -> None:
        self.path = heartbeat_file(run_dir, rank)
        self.rank, self.interval, self.step = rank, interval, 0
        self._stop = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        record = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "step": self.step,
                  "time": time.time()}
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except OSError:
                pass  # a full or vanished disk must not kill the training thread; the next beat retries

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)


def read_heartbeats(run_dir: str | Path, world_size: int) -> dict[int, dict | None]:
    """Each rank's last heartbeat record (None where no readable file exists)."""
    out: dict[int, dict | None] = {}
    for rank in range(world_size):
        try:
            out[rank] = json.loads(heartbeat_file(run_dir, rank).read_text())
        except (OSError, ValueError):
            out[rank] = None
    return out


def stale_ranks(run_dir: str | Path, world_size: int, max_age: float) -> list[tuple[int, dict | None, float]]:
    """Ranks whose heartbeat is older than ``max_age`` seconds (or missing): ``[(rank, record, age)]``."""
    now = time.time()
    stale = []
    for rank, rec in read_heartbeats(run_dir, world_size).items():
        age = now - rec["time"] if rec else float("inf")
        if age > max_age:
            stale.append((rank, rec, age))
    return stale


def describe_stale(stale: list[tuple[int, dict | None, float]]) -> str:
    """``rank 1 (pid 123 on host h, last heartbeat 12.0 s ago at step 3)`` for each stale rank."""
    parts = []
    for rank, rec, age in stale:
        if rec is None:
            parts.append(f"rank {rank} (no heartbeat file)")
        else:
            parts.append(f"rank {rank} (pid {rec['pid']} on host {rec['host']}, last heartbeat {age:.1f} s ago at "
                         f"step {rec['step']})")
    return ", ".join(parts)
