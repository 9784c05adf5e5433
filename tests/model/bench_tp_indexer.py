"""Measure the two ways a TP group can agree on the indexer top-k, on CPU with gloo ranks.

Design: docs/design.md#tensor-parallelism.

- ``replicated``: every TP rank scores all L queries (deterministic, identical results, no communication).
- ``split``: rank r scores the strided rows ``r::tp`` and the [L/tp, k] int32 indices are all-gathered.

Both must return identical indices (checked). Prints wall time (slowest rank) and the peak resident-memory growth
of the step per rank. Run: ``python -m tests.model.bench_tp_indexer [L] [tp]`` (not collected by pytest).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from tests._dist import run_distributed


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def _worker(rank: int, world: int, mode: str, seq: int, heads: int, dim: int, topk: int) -> dict:
    from dsa_dist.ops import dispatch, prepare_indexer_qk
    from dsa_dist.parallel import ParallelDims, rows_to_all

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq, heads, dim, generator=gen)
    k = torch.randn(1, seq, dim, generator=gen)
    w = torch.randn(1, seq, heads, generator=gen) * (heads * dim) ** -0.5
    pos = torch.arange(seq)
    dims = ParallelDims(world_size=world, tp=world, tp_rank=rank, tp_group=torch.distributed.group.WORLD)
    rows = slice(rank, None, world) if mode == "split" else slice(None)
    base = _rss_kb()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    prep = prepare_indexer_qk(q[:, rows], k, w[:, rows], q_positions=pos[rows], k_positions=pos, rope_dim=32,
                              hadamard=True, fp8=True)
    _, idx = dispatch.lightning_indexer_topk(prep.q_index, prep.k_index, prep.weights, topk, prep.k_scale,
                                             q_positions=pos[rows], k_positions=pos)
    if mode == "split":
        idx = rows_to_all(idx, dims)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_growth_mb": max(peak_kb - base, 0) / 1024, "indices": idx}


def main(seq: int = 4096, tp: int = 2, heads: int = 16, dim: int = 64, topk: int = 512) -> None:
    out = {}
    for mode in ("replicated", "split"):
        res = run_distributed(_worker, tp, mode, seq, heads, dim, topk, timeout=600)
        out[mode] = res
        print(f"{mode:>10}: L={seq} H_I={heads} d_I={dim} k={topk} tp={tp}  "
              f"time {max(r['seconds'] for r in res):.2f} s  "
              f"peak RSS growth {max(r['peak_growth_mb'] for r in res):.0f} MB/rank")
    same = all(torch.equal(a["indices"], b["indices"]) for a, b in zip(out["replicated"], out["split"]))
    print(f"identical indices: {same}")
    index_mb = seq * topk * 4 / 2**20
    print(f"[L, k] int32 indices: {index_mb:.1f} MB (held by every rank in both modes; split all-gathers "
          f"{index_mb * (tp - 1) / tp:.1f} MB/rank)")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*args)
