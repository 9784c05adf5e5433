"""init_parallel: single-process runs pick a free port (two at once on one machine do not collide), the collective
timeout reaches every group, and ParallelDims describes the layout (one type, frozen)."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch

from tests._dist import run_distributed


def _single_process_run(rank, world, flags):
    """One independent single-process run (its own world of 1): init, wait until the other run is up too (both
    hold their ports at once), check the timeouts, run a collective, tear down."""
    import time

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dsa_dist.parallel import destroy_parallel, init_parallel

    os.environ.pop("MASTER_PORT", None)  # run_distributed sets a shared one; a plain single-process run has none
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    dims = init_parallel(1, 1, timeout_s=42.5)
    me, other = Path(flags) / f"up{rank}", Path(flags) / f"up{1 - rank}"
    me.write_text("up")
    deadline = time.monotonic() + 120
    while not other.exists():
        assert time.monotonic() < deadline, "the other run never came up"
        time.sleep(0.05)
    groups = [dist.distributed_c10d._get_default_group(), ps.get_tensor_model_parallel_group(),
              ps.get_context_parallel_group()]
    timeouts = {g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups}
    t = torch.ones(1)
    dist.all_reduce(t)
    (Path(flags) / f"done{rank}").write_text("done")
    while not (Path(flags) / f"done{1 - rank}").exists():  # keep the port until the other run is done too
        assert time.monotonic() < deadline, "the other run never finished"
        time.sleep(0.05)
    destroy_parallel()
    return {"world": dims.world_size, "sum": t.item(), "timeouts": sorted(timeouts)}


def test_two_single_process_runs_at_once_do_not_collide(tmp_path):
    # Hold the port older versions hard-coded (29533), when it is free here: a run that still used it would fail.
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 29533))
        blocker.listen()
    except OSError:
        pass  # already taken by someone else: just as good
    try:
        results = run_distributed(_single_process_run, 2, str(tmp_path), init_process_group=False, timeout=180)
    finally:
        blocker.close()
    for r in results:
        assert r == {"world": 1, "sum": 1.0, "timeouts": [42.5]}


def _dims_worker(rank, world):
    from dsa_dist.parallel import current_parallel_dims, destroy_parallel, init_parallel

    dims = init_parallel(tp=2, cp=2)
    same = dims == current_parallel_dims()
    positions = dims.local_positions(4)
    # The TP group of this rank holds exactly the ranks with the same (cp, dp) coordinates.
    members = torch.tensor([rank])
    gathered = [torch.zeros_like(members) for _ in range(dims.tp)]
    torch.distributed.all_gather(gathered, members, group=dims.tp_group)
    destroy_parallel()
    return {"dims": dataclasses.replace(dims, tp_group=None, cp_group=None), "same": same, "positions": positions,
            "tp_peers": sorted(int(g) for g in gathered)}


def test_parallel_dims_describe_the_layout():
    results = run_distributed(_dims_worker, 4, init_process_group=False, timeout=180)
    for rank, r in enumerate(results):
        d = r["dims"]
        assert r["same"] and (d.world_size, d.tp, d.cp, d.pp, d.dp) == (4, 2, 2, 1, 1)
        assert d.tp_rank == rank % 2 and d.cp_rank == rank // 2  # Megatron's order: TP fastest, then CP
        assert r["tp_peers"] == [rank - rank % 2, rank - rank % 2 + 1]
        # zigzag: 2*cp = 4 chunks of 2 tokens; rank r holds chunks r and 3 - r
        expected = {0: [0, 1, 6, 7], 1: [2, 3, 4, 5]}[d.cp_rank]
        assert r["positions"].tolist() == expected
    with pytest.raises(dataclasses.FrozenInstanceError):
        results[0]["dims"].tp = 4


def test_bad_timeout_is_refused_before_any_rendezvous(monkeypatch):
    from dsa_dist.parallel import init_parallel

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds"):
        init_parallel(1, 1, timeout_s=0)
