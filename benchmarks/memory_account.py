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

On a GPU (``--device cuda``; the cases are then exactly those of ``benchmarks/cp_scaling.py``: bf16, the Triton
kernels, the small model with k = 512) the CUDA caching allocator's own history is replayed instead
(``torch.cuda.memory._record_memory_history``): the live blocks at the peak, grouped by the innermost frame of
dsa_dist, megatron or benchmarks that allocated them::

    python -m torch.distributed.run --nproc-per-node 1 benchmarks/memory_account.py --device cuda --part model \\
        --lengths 131072 --recompute full --mode allgather --out DIR
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
    at_backward_bytes: int = 0
    """Bytes live when the first autograd backward function starts (what the forward kept: saved activations,
    outputs); 0 when the call has no backward."""
    at_backward_by_site: dict[str, int] = field(default_factory=dict)
    """The same per allocation site."""


def _site(event) -> str:
    """The innermost frame of this repository above a profiler op event (``file(line): function``), or its op."""
    e = event
    while e is not None:
        name = e.name
        if ("dsa_dist/" in name or "benchmarks/" in name) and ".py(" in name and "memory_account" not in name:
            return name[name.index("dsa_dist/") if "dsa_dist/" in name else name.index("benchmarks/"):]
        e = e.parent
    return event.name


def _by_site(blocks: dict[int, tuple[int, str]]) -> dict[str, int]:
    """Live bytes per allocation site, largest first, from ``{pointer: (bytes, site)}``."""
    sites: dict[str, int] = defaultdict(int)
    for size, site in blocks.values():
        sites[site] += size
    return dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def peak_memory(fn: Callable[[], object]) -> MemoryPeak:
    """Run ``fn`` once under torch's CPU memory profiler; return its peak live bytes and their allocation sites.

    Reads the allocation events of the profiler's event tree directly (size, pointer, parent op): the memory
    profiler's data-flow graph rejects some in-place writes, which this code makes on purpose.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import OpTree

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    nodes = OpTree(prof.profiler.kineto_results).sorted_nodes
    backward_starts = [e.start_time_ns for e in nodes if e.name.startswith("autograd::engine::evaluate_function")]
    t_backward = min(backward_starts) if backward_starts else None
    live: dict[int, tuple[int, str]] = {}  # pointer -> (bytes, site) of blocks allocated during the call
    cur = peak = 0
    snapshot: dict = {}
    at_backward: dict | None = None
    for e in nodes:
        if e.typed[0] != _EventType.Allocation:
            continue
        if t_backward is not None and at_backward is None and e.start_time_ns >= t_backward:
            at_backward = dict(live)
        fields = e.typed[1]
        if fields.alloc_size > 0:
            live[fields.ptr] = (fields.alloc_size, _site(e.parent) if e.parent is not None else "(no op)")
            cur += fields.alloc_size
        elif fields.ptr in live:  # a block allocated before the call is not counted when freed either
            cur -= live.pop(fields.ptr)[0]
        if cur > peak:
            peak, snapshot = cur, dict(live)

    at_backward = at_backward or {}
    return MemoryPeak(peak, _by_site(snapshot), sum(size for size, _ in at_backward.values()), _by_site(at_backward))


def _frame_site(frames: list[dict]) -> str:
    """The innermost frame of this repository or Megatron-Core in a CUDA allocator trace entry."""
    for f in frames:
        name = f.get("filename", "")
        for root in ("dsa_dist/", "benchmarks/", "megatron/"):
            if root in name and "memory_account" not in name:
                return f"{name[name.index(root):]}({f.get('line')}): {f.get('name')}"
    return frames[0].get("name", "(no frame)") if frames else "(no frame)"


def cuda_peak_memory(fn: Callable[[], object]) -> MemoryPeak:
    """Run ``fn`` once with the CUDA caching allocator's history on; replay its alloc/free events for the peak of
    live bytes allocated during the call and the blocks live at that peak, by allocation site."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]
    live: dict[int, tuple[int, str]] = {}
    cur = peak = 0
    at_peak: dict = {}
    for ev in events:
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = (size, _frame_site(ev.get("frames", [])))
            cur += size
        elif action == "free_requested" and addr in live:  # the tensor is dead (its block may wait on a stream)
            cur -= live.pop(addr)[0]
        if cur > peak:
            peak, at_peak = cur, dict(live)
    return MemoryPeak(peak, _by_site(at_peak))


def _cuda_main(args) -> None:
    """One rank per GPU, the cp_scaling.py cases; writes memory_<part>_<L>_cp<CP>.json under --out (rank 0)."""
    import torch

    from benchmarks.cp_scaling import _layer_cfg, _model_cfg, make_layer_step, make_model_step, set_layout

    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dims = set_layout(world)
    for length in args.lengths:
        if args.part == "layer":
            step, _ = make_layer_step(_layer_cfg(False, length, args.mode), dims, length, True)
        else:
            step, _ = make_model_step(_model_cfg(False, length, args.mode, args.recompute), dims, length, True)
        step()  # warm-up: lazy buffers, compiled kernels, allocator segments
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = cuda_peak_memory(step)
        row = {"part": args.part, "L": length, "cp": world, "L_local": length // world, "mode": args.mode,
               "recompute": args.recompute, "device": torch.cuda.get_device_name(),
               "allocated_before_step_gib": round(base / 2**30, 3),
               "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
               "max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
               "step_peak_gib": round(result.peak_bytes / 2**30, 3),
               "sites_mib": {k: round(v / MIB, 1) for k, v in list(result.by_site.items())[: args.top]}}
        if rank == 0:
            print(json.dumps(row, indent=1), flush=True)
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                name = f"memory_{args.part}_{length // 1024}k_cp{world}_{args.recompute}.json"
                (args.out / name).write_text(json.dumps(row, indent=1))
        del step
        torch.cuda.empty_cache()
    dist.barrier()
    dist.destroy_process_group()


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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the cp_scaling.py cases on the GPUs, from the CUDA allocator's history")
    parser.add_argument("--out", type=Path, default=None, help="cuda: write one JSON per case here")
    args = parser.parse_args()
    if args.device == "cuda":
        _cuda_main(args)
        return
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
                              "sites_mib": {k: round(v / MIB, 2) for k, v in top.items()},
                              "at_backward_mib": round(result.at_backward_bytes / MIB, 2),
                              "at_backward_sites_mib": {k: round(v / MIB, 2) for k, v in
                                                        list(result.at_backward_by_site.items())[: args.top]}},
                             indent=1), flush=True)
        del step
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
