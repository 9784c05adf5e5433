"""The training tests leave nothing running: a session-end check of every process they started.

This pytest process becomes a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux): a process orphaned by
a test (e.g. the child of a run the test killed with SIGKILL) is re-parented to pytest instead of init, so it is
still found among pytest's descendants. At the end of the session every descendant but the long-lived helpers of
multiprocessing (forkserver, resource tracker) must be gone within a few seconds; leftovers are listed, killed,
and fail the session.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import psutil
import pytest

PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


_become_subreaper()


def _helpers() -> set[int]:
    """Long-lived multiprocessing helpers of this process (not leftovers of a test)."""
    import multiprocessing.forkserver as fs
    import multiprocessing.resource_tracker as rt

    pids = {getattr(fs._forkserver, "_forkserver_pid", None), getattr(rt._resource_tracker, "_pid", None)}
    return {p for p in pids if p}


def leftover_processes(grace_s: float = 8.0) -> list[psutil.Process]:
    """Descendants of this process still alive after ``grace_s`` (zombies are reaped and not counted)."""
    me = psutil.Process()
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for proc in me.children(recursive=True):
            if proc.pid in _helpers():
                continue
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    if proc.ppid() == os.getpid():
                        os.waitpid(proc.pid, os.WNOHANG)
                    continue
                alive.append(proc)
            except (psutil.NoSuchProcess, ChildProcessError):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    """Fail the session when a training test leaves a process running (after killing it)."""
    yield
    left = leftover_processes()
    if left:
        desc = []
        for proc in left:
            try:
                desc.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if desc:
            pytest.fail("training tests left processes running:\n" + "\n".join(desc), pytrace=False)
