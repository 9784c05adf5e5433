"""Python stacks of every rank when a benchmark case hangs (benchmarks/cp_scaling.py ``--hang-dump-s``).

A hung collective leaves no Python trace: NCCL's watchdog reports only sequence numbers, and a launcher that is
killed by ``timeout`` takes its workers down silently. Each rank therefore

- arms :func:`faulthandler.dump_traceback_later` for every case (:func:`hang_dump`): if the case is still
  running after ``seconds``, every thread's stack is written to stderr (the launcher logs it per rank) and the
  run continues — a long but healthy case only leaves an extra stack in the log;
- dumps its stacks on SIGTERM before dying (:func:`dump_stacks_on_sigterm`): torchrun forwards the SIGTERM
  that ``timeout`` sends it to every worker.
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
from collections.abc import Iterator
from typing import TextIO


@contextlib.contextmanager
def hang_dump(seconds: float | None, label: str = "", file: TextIO | None = None) -> Iterator[None]:
    """Within the context, dump every thread's stack to ``file`` (default stderr) once ``seconds`` pass;
    cancelled on exit. ``seconds`` None or ≤ 0: nothing is armed."""
    if seconds is None or seconds <= 0:
        yield
        return
    out = sys.stderr if file is None else file
    if label:
        print(f"[hang-dump] armed {seconds:g} s: {label}", file=out, flush=True)
    faulthandler.dump_traceback_later(seconds, repeat=False, file=out, exit=False)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def dump_stacks_on_sigterm(file: TextIO | None = None) -> None:
    """On SIGTERM, write every thread's stack to ``file`` (default stderr), then terminate as before."""
    faulthandler.register(signal.SIGTERM, file=sys.stderr if file is None else file, all_threads=True, chain=True)
