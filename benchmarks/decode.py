"""Batched decode throughput of the small DSA model, sparse vs dense attention over a KV cache (docs/design.md §5).

    python benchmarks/decode.py --out DIR [--lengths 4096,16384,65536,131072] [--batches 1,8,32,64] [--budget-s 200]
    python benchmarks/decode.py --smoke [--out DIR]      # CPU, tiny model: runs the whole script in seconds

Each row also reports the host syncs of one step (``set_sync_debug_mode("warn")`` on CUDA; 0 expected).

For each cache length L and batch size B, one cache of L rows per sequence and layer (the MLA latent, 576 → here
288 values, plus the FP8 index key and its scale) is filled with synthetic contents — random latent rows and random
FP8 index keys: the decode cost does not depend on the values, and prefilling 64 × 128K tokens would take minutes —
then two :class:`dsa_dist.rl.engine.DecodeEngine` share it, one decoding with the indexer top-k + sparse attention,
one with dense attention over all L rows. A timed step is what rollout generation does per token: ``engine.step``
(embedding, 12 layers — projections, FP8 index query, top-k over the index-key cache + sparse attention or dense
attention over the KV cache, MLP — and the output layer) plus ``sample_tokens`` (temperature 1). Every sequence sits
at position L, so the context stays L tokens; the step gets ``max_position=L`` (as rollout generation passes its
host-side bound), so both modes read the cache's first L + 1 rows and nothing past them. A step makes no host
synchronisation (tests/rl/test_decode_host_sync.py), so the timing is GPU time plus launch overhead. On CUDA the
step is captured once as a CUDA graph and replayed (``--cuda-graph``, default on; ``dsa_dist.rl.cuda_graph``), which
removes the launch overhead of its ~6,500 ops (eager steps cost ~35–55 ms of host time whatever B and L:
benchmarks/results/decode_h100_run1.md); the graph reads the whole cache, L + 1 rows, as ``max_position=L`` does.
The row's ``sparse_graph`` / ``dense_graph`` say ``replayed`` or why the step ran eagerly.
tokens/s = B / (median step time); peak memory is ``max_memory_allocated`` over the timed steps (model + cache +
workspaces). Rows whose cache would exceed ``--max-cache-gib`` are skipped; an out-of-memory step is reported as
OOM. Writes ``decode.json`` / ``decode.md``.

What each mode runs per layer (CUDA, through ``dsa_dist.ops.dispatch``; ``reference_fallbacks`` in the JSON
meta must be empty):

- **sparse**: the FP8 index query of the new token scored against all L cached FP8 index keys by the Triton
  indexer top-k kernel, one call for the batch with per-sequence positions (its key range split over programs
  and its exact selection split into key segments at decode, kernels/indexer_topk.py), then the Triton sparse
  attention over the k = 512 selected latent rows (split into slot groups for small B, merged by log-sum-exp).
- **dense** (the baseline): ``torch.nn.functional.scaled_dot_product_attention`` over the L + 1 cached latent
  rows — MLA absorbed, so one 288-d key / 256-d value head shared by the 16 query heads, which SDPA sees as 16
  query rows of one head (the cache is read once per sequence, never repeated per head) — with each sequence's
  causal limit as a boolean mask (all True here). On CUDA the timed dense steps run under ``sdpa_kernel`` with
  only the fused backends (memory-efficient, flash, cuDNN) allowed; MLA's 288/256 head dims leave PyTorch the
  memory-efficient kernel. A row where no fused kernel applies is retried with the math backend allowed and
  marked ``"dense_sdpa": "math"``. Caveat of this baseline: that kernel has no split over keys, so it runs
  a few programs per sequence over the whole cache; on the H100 its step at 128K took ~95 ms whatever B
  (1–32), far from the cache's bandwidth time — hence the second baseline.
- **dense_split** (the second baseline): exact dense attention through the Triton sparse attention kernel over
  every visible cached row, its slots split into groups that fill the GPU and merged by log-sum-exp
  (split-KV, "flash decoding"; ``DecodeEngine(dense_kernel="split")``). The ratio column divides the sparse
  tokens/s by the better of the two dense baselines.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import GIB, markdown_table, write_results  # noqa: E402

MODES = ("sparse", "dense", "dense_split")  # dense: PyTorch SDPA; dense_split: split-KV through the sparse kernel


def _init_single_rank() -> None:
    """One process, TP = CP = 1 (init_parallel picks a free rendezvous port when MASTER_PORT is unset)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from dsa_dist.parallel import init_parallel

    init_parallel(1, 1)


def _build(smoke: bool, max_len: int):
    from dsa_dist.model import DSARuntime, build_model, preset

    torch.manual_seed(0)
    cfg = preset("tiny") if smoke else dataclasses.replace(preset("small"), seq_len=max(4096, max_len))
    model = build_model(cfg, runtime=DSARuntime(attention="sparse", indexer_kl=False))
    model.eval()
    return cfg, model


@torch.no_grad()
def _fill_synthetic(cache, length: int) -> None:
    """Random contents for rows [0, length): latent ~ N(0, 1), FP8 index keys of N(0, 1) vectors, scales ~ 1/448."""
    for layer in cache.layers:
        layer.key[:, :length].normal_()
        if layer.value is not None:
            layer.value[:, :length].normal_()
        for b in range(layer.index_key.shape[0]):  # per sequence: bounded temporaries at 128K
            keys = torch.randn(length, layer.index_key.shape[-1], device=layer.index_key.device)
            layer.index_key[b, :length] = keys.to(layer.index_dtype).view(layer.index_key.dtype)
        if layer.index_scale is not None:
            layer.index_scale[:, :length].uniform_(0.5 / 448, 2.0 / 448)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_steps(engine, params, length: int, steps: int, warmup: int, cuda_graph: bool = False
                ) -> tuple[float, float | None, int, str | None]:
    """(median ms per decode step + sampling, peak GiB or None on CPU, host syncs in one more step — counted by
    ``set_sync_debug_mode("warn")`` on CUDA, as the host-sync calls of the CPU recorder in --smoke — and why the
    step ran eagerly when a CUDA graph was asked for, else None).

    ``cuda_graph``: ``engine.step`` is captured once (:class:`dsa_dist.rl.cuda_graph.GraphedDecodeStep`) and
    replayed; sampling stays eager."""
    from benchmarks.host_sync import count_cuda_syncs, count_host_sync_calls
    from dsa_dist.rl.sampling import sample_tokens

    device = engine.device
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.zeros(engine.batch, dtype=torch.long, device=device)
    positions = torch.full((engine.batch,), length, dtype=torch.long, device=device)

    if cuda_graph:
        from dsa_dist.rl.cuda_graph import GraphedDecodeStep

        # The graph reads the whole cache (capacity length + 1 rows: the same rows max_position=length reads).
        graphed = GraphedDecodeStep(engine, fallback="eager")

        def step():
            return graphed(tokens, positions)
    else:
        graphed = None

        def step():
            return engine.step(tokens, positions, max_position=length)

    def one() -> None:
        nonlocal tokens
        logits, _ = step()
        tokens = sample_tokens(logits, params, gen)[0]

    for _ in range(warmup):
        one()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    syncs, sites = (count_cuda_syncs if device.type == "cuda" else count_host_sync_calls)(one)
    if syncs:
        print(f"host syncs in a decode step at L={length} B={engine.batch}: {sites}", flush=True)
    eager_reason = None if graphed is None or graphed.graphed else graphed.reason
    return statistics.median(times), peak, syncs, eager_reason


def _time_mode(mode: str, engine, params, length: int, args: argparse.Namespace
               ) -> tuple[float, float | None, int, str | None, str | None]:
    """(ms, peak GiB, host syncs per step, eager reason, dense SDPA backend class or None): dense on CUDA is
    timed with the fused SDPA kernels only (a math fallback would not be a fair baseline), and retried with
    math allowed only if none applies."""
    if mode != "dense" or not torch.cuda.is_available():
        return (*_time_steps(engine, params, length, args.steps, args.warmup, args.cuda_graph), None)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    try:
        with sdpa_kernel(fused):
            return (*_time_steps(engine, params, length, args.steps, args.warmup, args.cuda_graph), "fused")
    except RuntimeError as err:
        if isinstance(err, torch.cuda.OutOfMemoryError):
            raise
        print(f"dense L={length} B={engine.batch}: no fused SDPA kernel ({str(err)[:200]}); timing math", flush=True)
        return (*_time_steps(engine, params, length, args.steps, args.warmup, args.cuda_graph), "math")


def run(args: argparse.Namespace) -> None:
    from dsa_dist.rl.engine import DecodeEngine
    from dsa_dist.rl.kv_cache import kv_cache_bytes_per_token
    from dsa_dist.rl.sampling import SamplingParams

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/decode.py: needs a CUDA GPU (or --smoke for the CPU check); nothing was measured.")
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    _init_single_rank()
    cfg, model = _build(args.smoke, max(lengths) + 1)
    params = SamplingParams(temperature=1.0, max_new_tokens=1)
    per_token = kv_cache_bytes_per_token(cfg) * cfg.num_layers
    t_start = time.perf_counter()
    results, rows = [], []
    for length in lengths:
        for batch in batches:
            cache_gib = per_token * batch * (length + 1) / GIB
            row = {"cache_len": length, "batch": batch, "cache_gib": round(cache_gib, 3)}
            if time.perf_counter() - t_start > args.budget_s:
                print(f"skipping L={length} B={batch}: past --budget-s", flush=True)
                continue
            if cache_gib > args.max_cache_gib:
                row["skipped"] = f"cache {cache_gib:.1f} GiB > --max-cache-gib {args.max_cache_gib}"
                results.append(row)
                rows.append([length, batch, "skip", "skip", "skip", "", "", f"{cache_gib:.2f}", "", ""])
                continue
            engines = {}
            try:
                engines["sparse"] = DecodeEngine(model, batch=batch, prefill_len=0, decode_len=length + 1,
                                                 attention="sparse")
                _fill_synthetic(engines["sparse"].cache, length)
                engines["dense"] = DecodeEngine(model, batch=batch, prefill_len=0, decode_len=length + 1,
                                                attention="dense", cache=engines["sparse"].cache,
                                                dense_kernel="sdpa")
                engines["dense_split"] = DecodeEngine(model, batch=batch, prefill_len=0, decode_len=length + 1,
                                                      attention="dense", cache=engines["sparse"].cache,
                                                      dense_kernel="split")
                for mode in MODES:
                    try:
                        ms, peak, syncs, eager_reason, sdpa = _time_mode(mode, engines[mode], params, length, args)
                        if sdpa:
                            row["dense_sdpa"] = sdpa
                        if args.cuda_graph:
                            row[f"{mode}_graph"] = eager_reason or "replayed"
                        row[mode] = {"ms_per_step": round(ms, 3), "tokens_per_s": round(batch / ms * 1e3, 1),
                                     "peak_gib": None if peak is None else round(peak, 3), "host_syncs": syncs}
                    except torch.cuda.OutOfMemoryError:
                        row[mode] = {"error": "OOM"}
                        torch.cuda.empty_cache()
                    except Exception as exc:  # noqa: BLE001 - one failing mode must not cost the other rows
                        traceback.print_exc()
                        row[mode] = {"error": f"n/a: {type(exc).__name__}: {str(exc)[:120]}"}
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM allocating the cache"
            del engines
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            results.append(row)
            rows.append(_table_row(row))
            print(rows[-1], flush=True)
    meta = _meta(args, cfg)
    headers = ["cache len", "batch", "sparse tok/s", "dense SDPA tok/s", "dense split-KV tok/s",
               "sparse / best dense", "ms/step sparse / SDPA / split", "cache GiB", "peak GiB sparse / split",
               "host syncs/step"]
    write_results(args.out, "decode", meta, results, markdown_table(headers, rows))


def _table_row(row: dict) -> list:
    s, d, ds = row.get("sparse", {}), row.get("dense", {}), row.get("dense_split", {})

    def get(m: dict, key: str):
        value = m.get(key, m.get("error", row.get("error", "n/a")))
        return "n/a" if value is None else value

    speed = ""
    best_dense = max((m["tokens_per_s"] for m in (d, ds) if "tokens_per_s" in m), default=None)
    if "tokens_per_s" in s and best_dense:
        speed = f"{s['tokens_per_s'] / best_dense:.2f}x"
    return [row["cache_len"], row["batch"], get(s, "tokens_per_s"), get(d, "tokens_per_s"),
            get(ds, "tokens_per_s"), speed,
            f"{get(s, 'ms_per_step')} / {get(d, 'ms_per_step')} / {get(ds, 'ms_per_step')}",
            f"{row['cache_gib']:.2f}", f"{get(s, 'peak_gib')} / {get(ds, 'peak_gib')}",
            f"{get(s, 'host_syncs')}, {get(d, 'host_syncs')}, {get(ds, 'host_syncs')}"]


def _meta(args: argparse.Namespace, cfg) -> dict:
    from dsa_dist.ops import dispatch

    meta = {"cuda_graph": args.cuda_graph,
            "model": "tiny" if args.smoke else "small", "attention": cfg.attention, "layers": cfg.num_layers,
            "topk": cfg.indexer.topk, "dtype": cfg.params_dtype, "steps": args.steps, "torch": torch.__version__,
            "cache_contents": "synthetic (random latent rows and FP8 index keys)",
            "dense_baseline": "torch SDPA over the L+1 cached latent rows (fused kernels only on CUDA; see "
                              "dense_sdpa per row), heads folded as rows of the one MLA latent head",
            "reference_fallbacks": dispatch.reference_fallbacks()}
    if torch.cuda.is_available():
        meta["device"] = torch.cuda.get_device_name()
    else:
        meta["device"] = "cpu (smoke: reference ops, not a measurement)"
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write decode.json / decode.md here")
    ap.add_argument("--smoke", action="store_true", help="CPU check at tiny sizes (tiny model, L 32/64, B 1/3)")
    ap.add_argument("--lengths", type=str, default=None, help="comma list of cache lengths")
    ap.add_argument("--batches", type=str, default=None, help="comma list of batch sizes")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per row (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, autotune)")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                    help="replay each decode step as a CUDA graph (default: on for CUDA, off for --smoke)")
    ap.add_argument("--budget-s", type=float, default=200, help="start no new row after this many seconds")
    ap.add_argument("--max-cache-gib", type=float, default=56, help="skip rows whose cache would be larger")
    args = ap.parse_args(argv)
    args.lengths = args.lengths or ("32,64" if args.smoke else "4096,16384,65536,131072")
    args.batches = args.batches or ("1,3" if args.smoke else "1,8,32,64")
    args.steps = args.steps or (2 if args.smoke else 10)
    if args.cuda_graph is None:
        args.cuda_graph = not args.smoke
    run(args)


if __name__ == "__main__":
    main()
