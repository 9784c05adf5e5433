"""Per-rank memory accounting of the CP scaling cases on CPU (docs/context_parallel.md "Memory per rank").

No GPU needed: torch's memory profiler records every CPU allocation and free of one step; the peak of live bytes
and the tensors live at that peak, grouped by the dsa_dist source line that allocated them, show which buffers
scale with the full sequence L and which with this rank's L/CP. Run at two lengths and two CP sizes, each line's
growth says which it is; the byte formulas in docs/context_parallel.md are checked against these lines.

CPU caveat: the reference ops (chunked sparse/dense attention, top-k, KL) allocate other workspaces than the
Triton kernels; the framework-level buffers (saved activations, gathered KV and index keys, top-k candidate
lists, collectives' buffers) are the same.

Run::

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/memory_account.py --part layer \\
        --lengths 2048 4096 --heads 16 --topk 128 [--mode ring] [--recompute full] [--top 12]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repo, unless dsa_dist is already importable

MIB = 2**20


@dataclass
class MemoryPeak:
    """Peak of live bytes allocated during a call (tensors alive before it do not count) and what held it."""

    peak_bytes: int
    by_site: dict[str, int] = field(default_factory=dict)
    """Bytes live at the peak per allocation site (innermost dsa_dist/benchmarks frame, else the op name)."""


def _site(event) -> str:
    """The innermost frame of this repository above a profiler op event (``file(line): function``), or its op."""
    e = event
    while e is not None:
        name = e.name
        if ("dsa_dist/" in name or "benchmarks/" in name) and ".py(" in name and "memory_account" not in name:
            return name[name.index("dsa_dist/") if "dsa_dist/" in name else name.index("benchmarks/"):]
        e = e.parent
    return event.name


def peak_memory(fn: Callable[[], object]) -> MemoryPeak:
    """Run ``fn`` once under torch's CPU memory profiler; return its peak live bytes and their allocation sites."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    mp = prof._memory_profile()
    creator = {}
    for node in mp._data_flow_graph.flow_nodes:
        for key in node.outputs:
            creator.setdefault(key, node._event)
    live: dict = {}
    cur = peak = 0
    snapshot: dict = {}
    for _, action, (key, _version), size in mp.timeline:
        if action == Action.CREATE:
            live[key] = size
            cur += size
        elif action == Action.DESTROY and key in live:
            cur -= live.pop(key)
        else:
            continue
        if cur > peak:
            peak, snapshot = cur, dict(live)
    by_site: dict[str, int] = defaultdict(int)
    for key, size in snapshot.items():
        event = creator.get(key)
        by_site[_site(event) if event is not None else "(unattributed)"] += size
    return MemoryPeak(peak, dict(sorted(by_site.items(), key=lambda kv: -kv[1])))


def main() -> None:
    from benchmarks.cp_scaling import make_layer_step, make_model_step, set_layout
    from dsa_dist.model.config import RecomputeConfig, preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="layer", choices=["layer", "model"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--heads", type=int, default=16, help="layer: main heads (V3.2: 128; scaled down on CPU)")
    parser.add_argument("--topk", type=int, default=128, help="k (V3.2: 2048; small: 512)")
    parser.add_argument("--mode", default="ring", choices=["ring", "allgather", "candidates"])
    parser.add_argument("--recompute", default="none", choices=["none", "full"])
    parser.add_argument("--top", type=int, default=12, help="allocation sites printed per case")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = set_layout(world)
    for length in args.lengths:
        if args.part == "layer":
            base = preset("v32-layer")
            cfg = replace(base, seq_len=length, num_heads=args.heads, params_dtype="float32",
                          indexer=replace(base.indexer, topk=args.topk, cp_topk_mode=args.mode))
            step, _ = make_layer_step(cfg, dims, length, True)
        else:
            base = preset("small")
            cfg = replace(base, seq_len=length, vocab_size=512, params_dtype="float32",
                          indexer=replace(base.indexer, topk=args.topk, cp_topk_mode=args.mode),
                          recompute=RecomputeConfig(granularity=args.recompute))
            step, _ = make_model_step(cfg, dims, length, True)
        step()  # warm-up (lazy buffers, caches)
        result = peak_memory(step)
        if rank == 0:
            top = dict(list(result.by_site.items())[: args.top])
            print(json.dumps({"part": args.part, "L": length, "cp": world, "L_local": length // world,
                              "topk": args.topk, "mode": args.mode, "recompute": args.recompute,
                              "peak_mib": round(result.peak_bytes / MIB, 2),
                              "sites_mib": {k: round(v / MIB, 2) for k, v in top.items()}}, indent=1), flush=True)
        del step
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
