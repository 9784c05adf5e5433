"""The CP top-k merges candidates in row chunks: its temporaries stay within a budget, its result is unchanged.

Measured with torch's CPU memory profiler (benchmarks/memory_account.py: allocations and frees of the call, peak
of live bytes) on 2 gloo ranks, ring and candidates modes: the peak with the default chunked merge is compared with
one merge over all rows at once (budget large enough for every row), which must hold the merge's sort temporaries
(measured: ~24 bytes per candidate beyond the result, 2k candidates per row) in full. The reference is the
unchunked result: identical scores and indices.
"""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed

ROWS, TOPK = 2048, 128  # per rank; 2k = 256 candidates per row → ~20 MiB of merge temporaries unchunked


def _worker(rank: int, ws: int, mode: str) -> dict:
    import torch.distributed as dist

    import dsa_dist.parallel.distributed_topk as dtk
    from benchmarks.memory_account import peak_memory
    from dsa_dist.parallel import distributed_indexer_topk

    torch.manual_seed(rank)
    q, k, w = torch.randn(1, ROWS, 2, 16), torch.randn(1, ROWS, 16), torch.randn(1, ROWS, 2)
    out = {}
    for name, budget in (("one_merge", 2**40), ("chunked", 2**20)):
        dtk.MERGE_BUDGET_BYTES = budget
        res = {}

        def call(res=res):
            res["s"], res["i"] = distributed_indexer_topk(q, w, k, None, TOPK, group=dist.group.WORLD, mode=mode,
                                                          chunk_size=256)

        call()  # warm-up
        out[name] = {"peak": peak_memory(call).peak_bytes, **res}
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["ring", "candidates"])
def test_chunked_merge_bounds_memory(mode):
    for out in run_distributed(_worker, 2, mode, timeout=280):
        assert torch.equal(out["chunked"]["i"], out["one_merge"]["i"])
        assert torch.equal(out["chunked"]["s"], out["one_merge"]["s"])
        one, chunked = out["one_merge"]["peak"] / 2**20, out["chunked"]["peak"] / 2**20
        # most of the merge temporaries of all rows (2k candidates per row) are gone
        saved = ROWS * 2 * TOPK * 40 / 2**20 * 0.4
        assert chunked < one - saved, f"{mode}: chunked peak {chunked:.1f} MiB vs one merge {one:.1f} MiB"
