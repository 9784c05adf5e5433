"""Run test cases under Triton's CPU interpreter, in a fresh Python process.

The interpreter is chosen when ``@triton.jit`` runs, i.e. when ``kernels`` is first imported, so it cannot be
switched on inside a pytest process that may already have imported the kernels. :func:`run_interpreted` starts
one child with ``TRITON_INTERPRET=1`` and ``DSA_BACKEND=triton`` for a whole list of case functions (one import
of torch and triton for all of them) and returns each case's traceback, or None when it passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_MARK = "@@interpreted-results@@"
_CHILD = f"""
import importlib, json, sys, traceback
module = importlib.import_module(sys.argv[1])
results = {{}}
for name in sys.argv[2:]:
    function, _, argument = name.partition(":")
    try:
        getattr(module, function)(*([argument] if argument else []))
        results[name] = None
    except BaseException:
        results[name] = traceback.format_exc()
print({_MARK!r} + json.dumps(results))
"""


def run_interpreted(module: str, cases: list[str], timeout: float = 600.0) -> dict[str, str | None]:
    """Run each case in one interpreter child; ``{case: traceback or None}``.

    A case is ``"function"`` (called as ``module.function()``) or ``"function:argument"`` (called with the string
    argument, for parametrized cases).
    """
    env = dict(os.environ, TRITON_INTERPRET="1", DSA_BACKEND="triton", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, module, *cases], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        crash = f"interpreter child exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return dict.fromkeys(cases, crash)
    return json.loads(lines[-1][len(_MARK):])


def check_interpreted(results: dict[str, str | None], case: str) -> None:
    """Fail with the child's traceback if ``case`` failed."""
    error = results[case]
    if error is not None:
        raise AssertionError(f"{case} failed under TRITON_INTERPRET=1:\n{error}")
