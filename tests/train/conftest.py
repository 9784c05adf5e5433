"""The training tests leave nothing running: an end-of-package check of every process they started.

This pytest process becomes a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux): a process orphaned by
a test (e.g. the child of a run the test killed with SIGKILL) is re-parented to pytest instead of init, so it is
still found among pytest's descendants. After the last test of ``tests/train`` every process started since its
first test (except the long-lived helpers of multiprocessing: forkserver, resource tracker) must be gone within a
few seconds; leftovers are listed, killed, and fail the run. Processes that were already running when the
package started (e.g. a Ray cluster of another test package) and their children are not counted.
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


def _preexisting(before: set[int]) -> set[int]:
    """``before`` and the current descendants of those of them still alive."""
    out = set(before)
    for pid in before:
        try:
            out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return out


def leftover_processes(grace_s: float = 8.0, before: set[int] = frozenset()) -> list[psutil.Process]:
    """Descendants of this process (not ``before`` or theirs) alive after ``grace_s``; zombies are reaped."""
    me = psutil.Process()
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        skip = _helpers() | _preexisting(before)
        for proc in me.children(recursive=True):
            if proc.pid in skip:
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


@pytest.fixture(scope="package", autouse=True)
def no_leftover_processes():
    """Fail when a training test leaves a process running (after killing it)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = leftover_processes(before=before)
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
