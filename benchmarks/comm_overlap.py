"""How much of a step's communication runs concurrently with compute, from a profiler timeline
(docs/context_parallel.md, "Measuring hidden communication").

Per rank, over the profiled steps, the device events (CUDA kernels, memcpy/memset) are split into
communication (NCCL kernels: the name contains ``nccl``) and compute (every other device event). With
``C`` = the union of the communication intervals and ``P`` = the union of the compute intervals:

- ``comm_s`` = |C| — time during which at least one NCCL kernel runs;
- ``hidden_s`` = |C ∩ P| — communication time during which at least one compute kernel runs too (on another
  stream);
- ``exposed_s`` = |C \\ P| = ``comm_s − hidden_s`` — communication time with the compute streams idle;
- ``hidden_share`` = ``hidden_s / comm_s`` (None without communication).

An NCCL kernel starts when its stream reaches it and ends when its data has moved, so its duration includes the
time it spins waiting for a peer that launched later: ``comm_s`` of a rank that arrives early is mostly waiting.
The rank with the least ``comm_s`` (the last to arrive) is the closest to the transfer time itself; both are
reported (:func:`summarise_ranks`).

:func:`overlap_stats` is pure interval arithmetic (unit-tested against a discretised timeline);
:func:`device_intervals` reads a finished ``torch.profiler.profile``; :func:`profile_rank` runs a step under
the profiler, :func:`profile_overlap` does so on every rank and gathers the per-rank numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

Interval = tuple[float, float]

NO_DEVICE_EVENTS = "no device events (the profiler saw no CUDA kernels: CPU run)"


# ------------------------------------------------------------------------------------------------ interval math
def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering exactly the union of ``intervals`` (empty ones dropped; touching ones
    merged)."""
    out: list[list[float]] = []
    for start, end in sorted((s, e) for s, e in intervals if e > s):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def total_length(intervals: Sequence[Interval]) -> float:
    """Summed length of disjoint intervals."""
    return sum(e - s for s, e in intervals)


def intersection_length(a: Sequence[Interval], b: Sequence[Interval]) -> float:
    """Length of (∪a) ∩ (∪b) for two sorted disjoint interval lists (a two-pointer sweep)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return total


def overlap_stats(comm: Iterable[Interval], compute: Iterable[Interval]) -> dict:
    """Communication time, the part of it overlapped by compute, and the rest (units of the inputs).

    Returns ``comm`` (|∪comm|), ``compute`` (|∪compute|), ``hidden`` (|∪comm ∩ ∪compute|), ``exposed``
    (``comm − hidden``), ``hidden_share`` (``hidden / comm``, None when there is no communication), ``span``
    (first start to last end over both kinds; 0 without events) and ``idle`` (``span`` minus the time any event
    runs).
    """
    c, p = union(comm), union(compute)
    comm_t, compute_t = total_length(c), total_length(p)
    hidden = intersection_length(c, p)
    both = c + p
    span = (max(e for _, e in both) - min(s for s, _ in both)) if both else 0.0
    return {"comm": comm_t, "compute": compute_t, "hidden": hidden, "exposed": comm_t - hidden,
            "hidden_share": hidden / comm_t if comm_t > 0 else None, "span": span,
            "idle": span - (comm_t + compute_t - hidden)}


# ------------------------------------------------------------------------------------------------ profiler events
def is_comm_kernel(name: str) -> bool:
    """NCCL kernels (``ncclDevKernel_AllGather_RING_LL``, ``ncclDevKernel_SendRecv``, ``ncclKernel_...``)."""
    return "nccl" in name.lower()


def _is_device_work(evt) -> bool:
    from torch.autograd import DeviceType

    return not (evt.device_type == DeviceType.CPU or getattr(evt, "is_user_annotation", False)
                or "annotation" in str(getattr(evt, "activity_type", "") or ""))


def device_intervals(events) -> tuple[list[Interval], list[Interval], int]:
    """``(comm, compute, n_events)`` in seconds from profiler events (``prof.events()``): every event whose
    ``device_type`` is not the CPU (kernels, memcpy, memset on the GPU), split by :func:`is_comm_kernel`.

    GPU user annotations are skipped: they are not work but the device-side span of a ``record_function`` range
    (``nccl:all_gather`` around its kernels, or a whole region), and one spanning a region would count as compute
    over everything in it."""

    comm: list[Interval] = []
    compute: list[Interval] = []
    for evt in events:
        if not _is_device_work(evt):
            continue
        interval = (evt.time_range.start / 1e6, evt.time_range.end / 1e6)  # the profiler's µs
        (comm if is_comm_kernel(evt.name) else compute).append(interval)
    return comm, compute, len(comm) + len(compute)


COMM_KINDS = ("AllGather", "ReduceScatter", "SendRecv", "AllReduce", "AllToAll")


def comm_kind(name: str) -> str:
    """The collective of an NCCL kernel name (``ncclDevKernel_ReduceScatter_Sum_f32_RING_LL`` → ``ReduceScatter``;
    all-to-all runs as ``SendRecv``), ``"other"`` when none is named."""
    low = name.lower()
    return next((k for k in COMM_KINDS if k.lower() in low), "other")


def comm_by_kind(events, compute: Sequence[Interval], steps: int) -> dict:
    """Per collective kind: ``comm_s`` / ``hidden_s`` per step and ``hidden_share`` of its kernels alone against
    the same compute (which collective the exposed time belongs to)."""
    kinds: dict[str, list[Interval]] = {}
    for evt in events:
        if _is_device_work(evt) and is_comm_kernel(evt.name):
            kinds.setdefault(comm_kind(evt.name), []).append((evt.time_range.start / 1e6, evt.time_range.end / 1e6))
    out = {}
    for kind, intervals in sorted(kinds.items()):
        s = overlap_stats(intervals, compute)
        out[kind] = {"comm_s": s["comm"] / steps, "hidden_s": s["hidden"] / steps, "hidden_share": s["hidden_share"],
                     "kernels": len(intervals) // steps}
    return out


def rank_stats(events, wall_s: float, steps: int) -> dict:
    """One rank's numbers per step (seconds), or ``{"note": NO_DEVICE_EVENTS}``; ``by_kind`` splits the
    communication by collective (:func:`comm_by_kind`)."""
    events = list(events)
    comm, compute, n = device_intervals(events)
    if n == 0:
        return {"note": NO_DEVICE_EVENTS, "wall_s": wall_s / steps}
    s = overlap_stats(comm, compute)
    per_step = {f"{k}_s": v / steps for k, v in s.items() if k != "hidden_share"}
    return {**per_step, "hidden_share": s["hidden_share"], "wall_s": wall_s / steps, "kernels": n // steps,
            "comm_kernels": len(comm) // steps, "by_kind": comm_by_kind(events, union(compute), steps)}


def summarise_ranks(per_rank: list[dict]) -> dict:
    """The row's ``overlap`` entry: every rank's numbers, the least hidden share over ranks, and the comm time of
    the rank that waits least (the fastest rank's comm-kernel time)."""
    measured = [r for r in per_rank if "note" not in r]
    out: dict = {"per_rank": per_rank}
    if not measured:
        out["note"] = per_rank[0]["note"] if per_rank else NO_DEVICE_EVENTS
        return out
    shares = [r["hidden_share"] for r in measured if r["hidden_share"] is not None]
    out["hidden_share_min"] = min(shares) if shares else None
    out["comm_s_max"] = max(r["comm_s"] for r in measured)
    out["comm_s_fastest_rank"] = min(r["comm_s"] for r in measured)
    out["exposed_s_max"] = max(r["exposed_s"] for r in measured)
    out["wall_s_max"] = max(r["wall_s"] for r in measured)
    return out


def profile_rank(step: Callable[[], None], steps: int = 1, trace_path: Path | None = None) -> dict:
    """This rank's :func:`rank_stats` of ``steps`` runs of ``step`` under torch.profiler (CUDA activity when
    available). A profiler that cannot start or whose events cannot be read gives ``{"note": why}`` instead of an
    exception (the other ranks still reach the gather); an error of ``step`` itself propagates."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    try:
        prof = profile(activities=activities)
        prof.start()
    except Exception as err:  # noqa: BLE001 - any profiler failure is reported in the row, not fatal
        return {"note": f"profiler did not start: {err!r}"}
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        prof.stop()
    try:
        if trace_path is not None:
            trace_path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace_path))
        return rank_stats(prof.events(), wall, steps)
    except Exception as err:  # noqa: BLE001 - as above
        return {"note": f"profiler events unreadable: {err!r}", "wall_s": wall / steps}


def profile_overlap(step: Callable[[], None], steps: int = 1, trace_path: Path | None = None) -> dict:
    """:func:`profile_rank` on every rank (aligned by a barrier first), and :func:`summarise_ranks` of all ranks —
    the same dict on every rank (collective: every rank must call it).

    ``trace_path``: also write this rank's chrome trace there (``.json.gz`` compresses)."""
    dist.barrier()
    mine = profile_rank(step, steps, trace_path)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return summarise_ranks(gathered)
