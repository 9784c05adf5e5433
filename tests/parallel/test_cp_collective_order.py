"""Every CP rank issues the same collectives, in the same order and with the same sizes, through one DSA layer's
forward + backward in each top-k mode — on 4 gloo ranks whose causal work differs by rank (zigzag shards), with
the ring's candidate merge split into many row chunks. NCCL matches operations by issue order per communicator,
so a rank-dependent count or order (a loop bound from a rank's data, a collective inside a chunked merge) would
hang the group; this is the invariant the ring top-k's 512K hang on 4 GPUs was audited against
(docs/context_parallel.md)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_distributed


def _worker(rank: int, world: int, mode: str) -> list:
    from benchmarks.cp_scaling import _layer_cfg, make_layer_step, set_layout
    from dsa_dist.parallel import _comm, distributed_topk

    torch.manual_seed(7)
    distributed_topk.MERGE_BUDGET_BYTES = 4096  # a few rows per merge chunk: many chunks per ring step
    dims = set_layout(world)
    step, _ = make_layer_step(_layer_cfg(True, 256, mode), dims, 256, True)
    with _comm.count_comm_bytes() as log:
        step()
    calls = [(kind, _comm.group_size_rank(group)[0], nbytes) for kind, group, nbytes in log.calls]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, calls)
    return everyone


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_every_rank_issues_the_same_collectives(mode):
    seen = run_distributed(_worker, 4, mode, timeout=220)[0]
    print(mode, seen[0])
    assert seen[0], "no collective was logged: the layer did not run under CP"
    if mode == "ring":
        assert sum(kind == "p2p" for kind, _, _ in seen[0]) == 3  # CP - 1 ring shifts
    for rank, calls in enumerate(seen[1:], start=1):
        assert calls == seen[0], f"rank {rank} issued {calls}, rank 0 {seen[0]}"
