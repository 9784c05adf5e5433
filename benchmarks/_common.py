"""Shared plumbing of the kernel benchmarks in benchmarks/indexer_topk.py and benchmarks/indexer_kl.py.

Only what both scripts do identically: refuse to run without CUDA, one ``triton.testing.do_bench`` median, the
peak extra memory of one call, run metadata, a markdown table, and writing ``<stem>.json`` / ``<stem>.md``.
benchmarks/attention.py keeps its own timing (other do_bench settings, explicit events for long calls).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def require_cuda(script: str) -> None:
    """Exit with a message when no CUDA device is visible (status 1): the kernels are timed on a GPU only."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")


def median_ms(fn: Callable[[], Any], rep_ms: float) -> float:
    """CUDA-event median of ``fn`` in ms: ``triton.testing.do_bench(fn, warmup=1, rep=rep_ms)``."""
    import triton

    return triton.testing.do_bench(fn, warmup=1, rep=rep_ms, return_mode="median")


def peak_extra_gib(fn: Callable[[], Any]) -> float:
    """GiB that one call of ``fn`` allocates beyond what is already allocated (its peak, not what it keeps)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def run_meta() -> dict:
    """Device and library versions, stored next to the numbers."""
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 2 decimals (ms and GiB) unless pre-formatted as strings."""

    def cell(x: Any) -> str:
        return f"{x:.2f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: Path | None, stem: str, meta: dict, results: list[dict], markdown: str) -> None:
    """Print the markdown; with ``out`` also write ``out/<stem>.json`` ({**meta, "results"}) and ``<stem>.md``."""
    print(markdown, flush=True)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    (out / f"{stem}.md").write_text(f"{meta}\n\n{markdown}\n")
    print(f"wrote {out / (stem + '.json')} and {stem}.md", flush=True)
