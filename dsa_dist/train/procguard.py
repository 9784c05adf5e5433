"""No orphans: every process a run starts dies with it, however it ends (docs/fault_tolerance.md "No orphans").

Megatron's ``torch_dist`` checkpoint writer starts processes of its own: a ``multiprocessing`` Manager (spawned
once per process, at its first save, and kept) whose queue collects the write results, and one forked writer
per checkpoint file during every save. Killed with ``kill -9`` (or SIGTERM without a handler), a Python process
leaves those children behind: the Manager lives on forever, and a writer forked mid-save hangs forever. Three
guards, each for a way a child can come to life:

- :func:`die_with_parent` — a process asks the kernel to send it SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``; Linux). dsa-train's local ranks call it first thing.
- :func:`guard_child_processes` — in a process that saves checkpoints: ``os.register_at_fork`` makes every
  *forked* child (Megatron's writers) call :func:`die_with_parent`; and a small watchdog process
  (``python -m dsa_dist.train.procguard PID``) records PID's descendants every 0.2 s and, once PID is gone,
  kills every recorded one still alive (the spawned Manager, which no hook of ours runs in). The watchdog
  ignores SIGINT/SIGTERM/SIGHUP (so a Ctrl-C of the process group does not stop it before it has cleaned up)
  and exits as soon as its work is done.

Everything here is a no-op on platforms without ``prctl`` except the watchdog, which only needs ``psutil``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
_state = {"guarded_pid": None, "parent": None, "watchdog": None}
WATCH_INTERVAL_S = 0.2


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux); True when armed.

    ``parent_pid``: the parent this process should have; if it is already gone (reparented), exit now.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the signal was armed
    return True


def _before_fork() -> None:
    _state["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(signal.SIGKILL, _state["parent"])


def guard_child_processes() -> None:
    """Make every process this one starts die with it (idempotent, once per process; see the module docstring)."""
    if _state["guarded_pid"] == os.getpid():
        return
    if _state["guarded_pid"] is None:  # hooks are inherited by forked children: register them once
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _state["guarded_pid"] = os.getpid()
    _state["watchdog"] = start_watchdog(os.getpid())


def start_watchdog(pid: int) -> subprocess.Popen | None:
    """Start the watchdog that kills ``pid``'s descendants once ``pid`` is gone (None without psutil)."""
    try:
        import psutil  # noqa: F401  (a dependency of Megatron's checkpointing; checked here for a clear no-op)
    except ImportError:
        return None
    return subprocess.Popen([sys.executable, "-m", "dsa_dist.train.procguard", str(pid)], stdin=subprocess.DEVNULL,
                            close_fds=True)


def _watch(pid: int) -> None:
    import psutil

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    me = os.getpid()
    try:
        target = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            if target.status() == psutil.STATUS_ZOMBIE:
                break
            for child in target.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(WATCH_INTERVAL_S)
    # The target is gone: kill what it left, and what those started since (psutil checks pid reuse).
    victims = dict(seen)
    for proc in seen.values():
        try:
            victims.update((c.pid, c) for c in proc.children(recursive=True) if c.pid != me)
        except psutil.NoSuchProcess:
            pass
    for proc in victims.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
