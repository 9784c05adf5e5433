"""benchmarks/comm_overlap.py: the hidden / exposed communication arithmetic against a discretised timeline, and
the per-rank summary."""

from __future__ import annotations

import random

import pytest

from benchmarks.comm_overlap import (
    NO_DEVICE_EVENTS,
    device_intervals,
    overlap_stats,
    profile_rank,
    rank_stats,
    summarise_ranks,
    union,
)

GRID = 0.25  # interval ends are multiples of this, so sampling cell midpoints is exact


def _covered(intervals, t):
    return any(s <= t < e for s, e in intervals)


def _brute(comm, compute):
    """The same numbers by walking the timeline cell by cell (independent of the sweep in overlap_stats)."""
    ends = [x for iv in comm + compute for x in iv]
    if not ends:
        return {"comm": 0.0, "compute": 0.0, "hidden": 0.0, "exposed": 0.0, "hidden_share": None, "span": 0.0,
                "idle": 0.0}
    lo, hi = min(ends), max(ends)
    c = p = both = busy = 0
    n = round((hi - lo) / GRID)
    for i in range(n):
        t = lo + (i + 0.5) * GRID
        in_c, in_p = _covered(comm, t), _covered(compute, t)
        c += in_c
        p += in_p
        both += in_c and in_p
        busy += in_c or in_p
    spans = [(s, e) for s, e in comm + compute if e > s]
    span = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0
    return {"comm": c * GRID, "compute": p * GRID, "hidden": both * GRID, "exposed": (c - both) * GRID,
            "hidden_share": both / c if c else None, "span": span, "idle": span - busy * GRID}


def _check(comm, compute):
    got, want = overlap_stats(comm, compute), _brute(comm, compute)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, abs=1e-9), (key, comm, compute)
    return got


def test_hand_made_cases():
    # comm [0, 4) with compute over half of it -> 2 hidden, 2 exposed
    s = _check([(0, 4)], [(1, 3)])
    assert (s["hidden"], s["exposed"], s["hidden_share"]) == (2, 2, 0.5)
    # nested and overlapping comm kernels count once; compute fully covering -> all hidden
    s = _check([(1, 5), (2, 3), (4, 6)], [(0, 10)])
    assert (s["comm"], s["hidden"], s["exposed"], s["hidden_share"]) == (5, 5, 0, 1.0)
    # touching intervals: no double count, no gap
    s = _check([(0, 1), (1, 2)], [(2, 3), (3, 4)])
    assert (s["comm"], s["compute"], s["hidden"], s["exposed"], s["idle"]) == (2, 2, 0, 2, 0)
    # a gap between the two kinds is idle time
    s = _check([(0, 1)], [(3, 4)])
    assert (s["span"], s["idle"]) == (4, 2)
    # empty inputs and zero-length events
    assert _check([], [])["hidden_share"] is None
    assert _check([], [(0, 2)])["hidden_share"] is None
    assert _check([(1, 1)], [(0, 2)])["comm"] == 0
    assert _check([(0, 2)], [])["exposed"] == 2


def test_random_timelines_match_the_discretised_reference():
    rng = random.Random(20261126)
    print("seed 20261126")
    for _ in range(300):
        def intervals(n):
            out = []
            for _ in range(n):
                a, b = rng.randint(0, 80), rng.randint(0, 80)
                out.append((min(a, b) * GRID, max(a, b) * GRID))
            return out
        _check(intervals(rng.randint(0, 7)), intervals(rng.randint(0, 7)))


def test_union_merges_nested_overlapping_and_touching():
    assert union([(5, 6), (0, 2), (1, 3), (3, 4), (0.5, 1), (7, 7)]) == [(0, 4), (5, 6)]


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end


class _Event:
    def __init__(self, name, device, start_us, end_us, annotation=False):
        from torch.autograd import DeviceType

        self.name = name
        self.device_type = DeviceType.CUDA if device else DeviceType.CPU
        self.time_range = _Range(start_us, end_us)
        self.is_user_annotation = annotation


def test_events_are_split_into_nccl_and_compute_and_cpu_events_and_annotations_ignored():
    events = [_Event("ncclDevKernel_AllGather_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", True, 0, 400),
              _Event("ncclDevKernel_SendRecv", True, 500, 600),
              _Event("_score_kernel", True, 100, 300),
              _Event("Memcpy DtoD (Device -> Device)", True, 550, 560),
              _Event("aten::mm", False, 0, 1000),            # a CPU op: not device time
              _Event("nccl:all_gather", False, 0, 1000),     # the CPU-side record of the collective
              _Event("forward", True, 0, 1000, annotation=True)]  # a GPU user annotation: a span, not work
    comm, compute, n = device_intervals(events)
    assert n == 4
    assert comm == [(0.0, 400e-6), (500e-6, 600e-6)] and len(compute) == 2
    s = rank_stats(events, wall_s=2e-3, steps=2)
    assert s["comm_s"] == pytest.approx(250e-6) and s["hidden_s"] == pytest.approx(105e-6)
    assert s["hidden_share"] == pytest.approx(210 / 500) and s["wall_s"] == pytest.approx(1e-3)
    # Split by collective: the all-gather is half under the score kernel, the send/recv a tenth under the memcpy.
    assert set(s["by_kind"]) == {"AllGather", "SendRecv"}
    assert s["by_kind"]["AllGather"]["comm_s"] == pytest.approx(200e-6)
    assert s["by_kind"]["AllGather"]["hidden_share"] == pytest.approx(0.5)
    assert s["by_kind"]["SendRecv"]["hidden_s"] == pytest.approx(5e-6)
    assert s["by_kind"]["SendRecv"]["hidden_share"] == pytest.approx(0.1)


def test_no_device_events_is_reported_not_raised():
    per_rank = [rank_stats([_Event("aten::mm", False, 0, 5)], 1.0, 1) for _ in range(2)]
    summary = summarise_ranks(per_rank)
    assert summary["note"] == NO_DEVICE_EVENTS and "hidden_share_min" not in summary


def test_summary_takes_the_least_hidden_rank_and_the_fastest_ranks_comm():
    a = {"comm_s": 0.4, "exposed_s": 0.1, "hidden_share": 0.75, "wall_s": 1.0}
    b = {"comm_s": 0.1, "exposed_s": 0.05, "hidden_share": 0.5, "wall_s": 1.1}
    s = summarise_ranks([a, b])
    assert (s["hidden_share_min"], s["comm_s_fastest_rank"], s["comm_s_max"], s["exposed_s_max"],
            s["wall_s_max"]) == (0.5, 0.1, 0.4, 0.1, 1.1)


def test_profile_rank_on_cpu_runs_the_steps_and_reports_no_device_events(tmp_path):
    import torch

    calls = []
    x = torch.randn(64, 64)

    def step():
        calls.append(1)
        (x @ x).sum()

    out = profile_rank(step, steps=2, trace_path=tmp_path / "t" / "rank0.json.gz")
    assert len(calls) == 2 and out["note"] == NO_DEVICE_EVENTS and out["wall_s"] > 0
    assert (tmp_path / "t" / "rank0.json.gz").stat().st_size > 0


def test_a_profiler_that_cannot_start_is_reported_and_a_failing_step_is_not_hidden(monkeypatch):
    import torch.profiler

    class _Broken:
        def __init__(self, **kw):
            pass

        def start(self):
            raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(torch.profiler, "profile", _Broken)
    out = profile_rank(lambda: None)
    assert out["note"].startswith("profiler did not start") and "CUPTI unavailable" in out["note"]
    monkeypatch.undo()

    def oom():
        raise MemoryError("step failed")

    with pytest.raises(MemoryError):
        profile_rank(oom)
