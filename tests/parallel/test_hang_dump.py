"""benchmarks/hang_dump.py: a case still running after the limit leaves every thread's stack; a finished one
leaves nothing; SIGTERM dumps the stacks before the process ends."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.hang_dump import hang_dump


def _stuck_in_a_collective(seconds: float) -> None:
    time.sleep(seconds)  # stands in for a rank blocked in a collective


def test_armed_dump_fires_with_the_stack_and_the_run_continues(tmp_path):
    path = tmp_path / "stderr.txt"
    with open(path, "w") as f:
        with hang_dump(0.2, "layer:524288:4", file=f):
            _stuck_in_a_collective(0.8)
        after = "still running"  # exit=False: the process was not ended
    text = path.read_text()
    assert "armed 0.2 s: layer:524288:4" in text
    assert "_stuck_in_a_collective" in text and after


def test_cancelled_when_the_case_ends_in_time_and_off_when_not_armed(tmp_path):
    path = tmp_path / "stderr.txt"
    with open(path, "w") as f:
        with hang_dump(0.4, "quick", file=f):
            pass
        with hang_dump(0, "off", file=f):
            pass
        time.sleep(0.8)
    text = path.read_text()
    assert "armed 0.4 s: quick" in text and "off" not in text
    assert "Traceback" not in text and "File " not in text


def test_sigterm_dumps_the_stacks_then_terminates():
    repo = Path(__file__).resolve().parents[2]
    code = (f"import os, signal, sys; sys.path.insert(0, {str(repo)!r})\n"
            "from benchmarks.hang_dump import dump_stacks_on_sigterm\n"
            "dump_stacks_on_sigterm()\n"
            "def waiting_for_peer():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "waiting_for_peer()\n"
            "print('not reached')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGTERM
    assert "waiting_for_peer" in out.stderr and "not reached" not in out.stdout
