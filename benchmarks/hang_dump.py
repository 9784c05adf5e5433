"""Python stacks of every rank when a benchmark case hangs (benchmarks/cp_scaling.py ``--hang-dump-s``).

A hung collective leaves no Python trace: NCCL's watchdog reports only sequence numbers, and a launcher that is
killed by ``timeout`` takes its workers down silently. Each rank therefore

- arms a timer thread for every case (:func:`hang_dump`): if the case is still running after ``seconds``, every
  thread's stack is written to stderr (the launcher logs it per rank) and the run continues — a long but healthy
  case only leaves an extra stack in the log. The timer formats the stacks with the GIL held
  (``sys._current_frames``), which a rank blocked in a collective has released. ``faulthandler``'s own timer
  reads the other threads' frames without the GIL: firing while the main thread ran Python code (gloo group
  set-up) crashed a CPU test run with SIGSEGV;
- dumps its stacks on SIGTERM before dying (:func:`dump_stacks_on_sigterm`): torchrun forwards the SIGTERM
  that ``timeout`` sends it to every worker.
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import TextIO


def _write_stacks(out: TextIO) -> None:
    """Every thread's Python stack, most recent call last, to ``out`` (called with the GIL held)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # the timer thread itself
        lines.append(f"Thread {ident:#x} ({names.get(ident, '?')}), most recent call last:\n")
        lines.extend(traceback.format_stack(frame))
    out.write("".join(lines))
    out.flush()


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
    timer = threading.Timer(seconds, _write_stacks, args=(out,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def dump_stacks_on_sigterm(file: TextIO | None = None) -> None:
    """On SIGTERM, write every thread's stack to ``file`` (default stderr), then terminate as before."""
    faulthandler.register(signal.SIGTERM, file=sys.stderr if file is None else file, all_threads=True, chain=True)
