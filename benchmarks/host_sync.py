"""Host syncs and host-bound time of one sparse-training DSA layer (docs/design.md, "No host sync per layer").

    python benchmarks/host_sync.py --out DIR [--length 32768] [--shapes small,V3.2] [--reps 3]
    python benchmarks/host_sync.py --smoke [--out DIR]        # CPU: tiny presets, reference ops

One DSA attention layer built from the model code (Megatron module, ``DSARuntime`` sparse training: FP8 indexer,
exact top-k, sparse attention, sparse KL attached to the output) runs forward + backward on one GPU at
``--length`` tokens (batch 1). Shapes: ``small`` (GQA-like MQA: H=16, d=128, one KV head; indexer 8 × 64; k=2048)
and ``V3.2`` (the ``v32-layer`` preset: MLA H=128, 576/512; indexer 64 × 128; k=2048). Per shape it reports:

- ``gpu_ms``: CUDA-event time of a step (median of ``--reps``);
- ``wall_ms``: wall-clock of the step including the final ``torch.cuda.synchronize()``;
- ``enqueue_ms``: wall-clock until the step's Python returns, before that synchronisation. Without host syncs
  the host runs ahead of the GPU and ``enqueue_ms`` < ``gpu_ms``; a sync in the step pins them together;
- ``syncs``: synchronising CUDA calls in one step, counted as the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")``, with where they came from (``sync_sites``).

``--smoke`` runs the tiny presets on CPU in seconds (reference ops); there is no CUDA to warn, so ``syncs``
counts the host-sync *calls* that :class:`tests._host_sync.HostSyncRecorder` sees instead. Writes
``host_sync.json`` and ``host_sync.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import markdown_table, write_results  # noqa: E402
from dsa_dist.model.config import DSAModelConfig, GQAConfig, preset  # noqa: E402
from dsa_dist.model.runtime import SPARSE_TRAIN  # noqa: E402


def shape_config(name: str, length: int) -> DSAModelConfig:
    """The layer's model config: ``small`` (GQA-like, H=16 d=128), ``V3.2`` (v32-layer), ``tiny``/``tiny-gqa``."""
    if name == "small":
        base = preset("small-gqa")
        return replace(base, seq_len=length, gqa=GQAConfig(num_kv_heads=1, head_dim=128),
                       indexer=replace(base.indexer, heads=8, head_dim=64, topk=2048))
    if name == "V3.2":
        return replace(preset("v32-layer"), seq_len=length)
    if name in ("tiny", "tiny-gqa"):
        return replace(preset(name), seq_len=length)
    raise ValueError(f"unknown shape {name!r}; choose small, V3.2 (GPU) or tiny, tiny-gqa (--smoke)")


def build_layer(cfg: DSAModelConfig, device: torch.device):
    """(attention module, tracker) of one sparse-training DSA layer with the KL attached to its output."""
    from megatron.core.transformer.spec_utils import build_module

    from dsa_dist.model.indexer_loss import IndexerLossTracker
    from dsa_dist.model.specs import dsa_attention_spec

    tracker = IndexerLossTracker(attach_coeff=1.0)
    attn = build_module(dsa_attention_spec(cfg, SPARSE_TRAIN, tracker), config=cfg.to_transformer_config(None),
                        layer_number=1)
    return attn.to(device), tracker


def _repo_site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame in this repository (not torch, not this script): where a sync was asked for."""
    for frame in reversed(stack):
        path = Path(frame.filename)
        if ROOT in path.parents and path.name != Path(__file__).name and ".venv" not in path.parts:
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return "outside the repository (torch/megatron)"


def count_cuda_syncs(step) -> tuple[int, dict[str, int]]:
    """Synchronising CUDA calls in one ``step()``: the warnings of ``set_sync_debug_mode("warn")``, by site."""
    sites: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            sites[_repo_site(traceback.extract_stack()[:-1])] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum(sites.values()), dict(sites)


def count_host_sync_calls(step) -> tuple[int, dict[str, int]]:
    """CPU stand-in for :func:`count_cuda_syncs`: host-sync calls seen by the test recorder, by site."""
    from tests._host_sync import HostSyncRecorder

    with HostSyncRecorder() as rec:
        step()
    sites = Counter(call.split(" at ", 1)[-1].replace(str(ROOT) + "/", "") for call in rec.calls)
    return len(rec.calls), dict(sites)


def measure(shape: str, length: int, reps: int, device: torch.device) -> dict:
    """Timings and sync count of one layer forward + backward (see the module docstring)."""
    cfg = shape_config(shape, length)
    torch.manual_seed(0)
    attn, tracker = build_layer(cfg, device)
    dtype = cfg.torch_dtype if device.type == "cuda" else torch.float32
    attn = attn.to(dtype)
    x = torch.randn(length, 1, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def step() -> None:
        tracker.begin_forward()
        out, _ = attn(x, None)
        out.backward(grad)
        x.grad = None
        attn.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # warm-up: Triton compilation, allocator, lazy imports
    sync()
    first_s = time.perf_counter() - t0
    gpu, wall, enqueue = [], [], []
    for _ in range(reps):
        sync()
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        if on_gpu:
            end.record()
        sync()
        t2 = time.perf_counter()
        enqueue.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
        if on_gpu:
            gpu.append(start.elapsed_time(end))
    syncs, sites = (count_cuda_syncs if on_gpu else count_host_sync_calls)(step)
    row = {"shape": shape, "length": length, "heads": cfg.num_heads, "topk": cfg.indexer.topk,
           "first_step_s": round(first_s, 2), "enqueue_ms": statistics.median(enqueue),
           "wall_ms": statistics.median(wall), "gpu_ms": statistics.median(gpu) if gpu else None,
           "syncs": syncs, "sync_sites": sites}
    if on_gpu:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row  # the layer and its inputs are freed with this frame before the next shape is built


def table(rows: list[dict]) -> str:
    headers = ["shape", "L", "H", "k", "GPU ms (events)", "wall ms", "enqueue ms", "syncs / step", "sites"]
    body = [[r["shape"], r["length"], r["heads"], r["topk"],
             "n/a (CPU)" if r["gpu_ms"] is None else r["gpu_ms"], r["wall_ms"], r["enqueue_ms"], r["syncs"],
             ", ".join(f"{s} ×{n}" for s, n in r["sync_sites"].items()) or "none"] for r in rows]
    return markdown_table(headers, body)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write host_sync.json / host_sync.md here")
    ap.add_argument("--length", type=int, default=32768, help="tokens (batch 1); --smoke: 64")
    ap.add_argument("--shapes", default="small,V3.2", help="comma list of small, V3.2 (--smoke: tiny, tiny-gqa)")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per shape (median reported)")
    ap.add_argument("--smoke", action="store_true", help="CPU run of the tiny presets (reference ops)")
    args = ap.parse_args(argv)
    if args.smoke:
        device, shapes = torch.device("cpu"), ["tiny", "tiny-gqa"]
        length = 64 if args.length == 32768 else args.length
    else:
        if not torch.cuda.is_available():
            sys.exit("host_sync.py: needs a CUDA GPU (or --smoke for the CPU run); nothing was measured.")
        device, shapes, length = torch.device("cuda"), args.shapes.split(","), args.length
    os.environ.pop("MASTER_PORT", None)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from dsa_dist.parallel import destroy_parallel, init_parallel

    init_parallel(1, 1)
    rows = []
    try:
        for shape in shapes:
            rows.append(measure(shape, length, args.reps, device))
            print(rows[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    finally:
        destroy_parallel()
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    write_results(args.out, "host_sync", meta, rows, table(rows))


if __name__ == "__main__":
    main()
