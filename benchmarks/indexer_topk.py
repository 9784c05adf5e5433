"""GPU benchmark of the FP8 lightning indexer + exact top-k kernels (kernels/indexer_topk.py).

Design: docs/design.md#top-k-and-the-tie-rule.

    python benchmarks/indexer_topk.py [--lengths 8192 32768 ...] [--shapes V3.2 small] [--no-sweep]
                                      [--impls workspace filter] [--sample-rank 64 ...] [--out DIR]

Measures, B = 1, causal, fresh random FP8 inputs made as the model makes them (``prepare_indexer_qk`` without
rope: e4m3 q/k, q scale folded into the weights, per-key scale):
- a score-tile sweep: the score kernel alone over one whole causal triangle at ``--sweep-length`` for a few
  (BLOCK_Q, BLOCK_K, num_warps, num_stages) configs per shape (``--no-sweep`` skips it);
- end to end, per shape and length, for each top-k selection path (``--impls``, default both in the same run:
  ``kernels.indexer_topk.SELECT_IMPL`` = "workspace", the dense fp32 score rows + select + sort, and "filter", the
  threshold-filtered scoring of kernels/topk_filter.py): the whole ``lightning_indexer_topk`` op, its phases timed
  separately over the same chunking (workspace: score chunks, select+sort chunks; filter: thresholds from the
  sampled keys, filtered score chunks, sort; the filter's dense fallback is the rest of its total, and its row
  count is printed), and the op's peak extra memory (``max_memory_allocated`` after a reset, minus what the
  inputs hold); at L = 32768 also select-kernel variants (radix only, block sizes) of the workspace path.
Times are CUDA-event medians of ``triton.testing.do_bench(warmup=1, return_mode="median")`` with rep = 200 ms for
the sweep, 1000 ms up to 32K and 1 ms beyond (do_bench's minimum: one timed call after its 5-call estimate).
FLOPs are FP8-effective: 2·H_I·d_I per causal (query, key) pair (``dsa_dist.ops.indexer.indexer_flops``);
the top-k phase adds none, so "TFLOPS" of the whole op counts the score FLOPs over the op's total time.
Shapes: V3.2 (H_I = 64, d_I = 128, k = 2048) and small (H_I = 8, d_I = 64, k = 512). Prints markdown tables;
with ``--out`` writes ``indexer_topk.json`` and ``indexer_topk.md`` there. Results: benchmarks/NOTES_indexer.md.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.indexer_topk as kt  # noqa: E402
import kernels.topk_filter as tf  # noqa: E402
from benchmarks._common import (  # noqa: E402
    markdown_table,
    median_ms,
    peak_extra_gib,
    require_cuda,
    run_meta,
    write_results,
)
from dsa_dist.ops import prepare_indexer_qk  # noqa: E402
from dsa_dist.ops.indexer import indexer_flops  # noqa: E402

# name -> (H_I, d_I, top-k)
SHAPES = {"V3.2": (64, 128, 2048), "small": (8, 64, 512)}
# (H_I, d_I) -> score tile configs (BLOCK_Q, BLOCK_K, num_warps, num_stages) tried by the sweep; first = default
SWEEP = {(64, 128): [(2, 128, 4, 3), (2, 64, 4, 4)], (8, 64): [(16, 128, 4, 3), (16, 64, 4, 4)]}
# select-kernel variants timed at L = 32768: (fast threshold path, config); (False, None) = radix only
SELECT_VARIANTS = [(False, None), (True, {"BLOCK": 512, "num_warps": 4}), (True, {"BLOCK": 1024, "num_warps": 2}),
                   (True, {"BLOCK": 2048, "num_warps": 4})]


def fp8_indexer_inputs(length: int, heads: int, dim: int, seed: int):
    """B = 1 FP8 indexer inputs (``IndexerInputs``): bf16 randn q/k, weights ~ N(0, 1/(H_I·d_I)), quantised."""
    torch.manual_seed(seed)
    q = torch.randn(1, length, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1, length, heads, device="cuda") * (heads * dim) ** -0.5
    return prepare_indexer_qk(q, k, w, rope_dim=0, fp8=True)


def sweep_scores(h: int, d: int, length: int, cfgs: list[tuple], results: list[dict]) -> tuple:
    """Time the score kernel alone over one whole causal triangle for each tile config; (best TFLOPS, cfg)."""
    inp = fp8_indexer_inputs(length, h, d, seed=0)
    qp, kp, wp, ks = kt._prepare(inp.q_index, inp.k_index, inp.weights, inp.k_scale)
    pos = torch.arange(length, device="cuda")
    row_len = kt._row_lengths(pos, pos)
    ws = torch.empty(1, length, length, device="cuda")
    flops = indexer_flops(length, length, h, d)
    best = (0.0, None)
    for bq, bk, nw, ns in cfgs:
        cfg = {"BLOCK_Q": bq, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
        fn = functools.partial(kt.score_chunk, qp, kp, wp, ks, pos, pos, row_len, 0, length, ws, cfg)
        try:
            ms = median_ms(fn, 200)
        except Exception as e:  # noqa: BLE001 — a config that fails to compile is reported, not fatal
            print(f"score H={h} d={d} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
            results.append({"what": "score_sweep", "H": h, "d": d, "L": length, **cfg,
                            "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        tf = flops / ms / 1e9
        results.append({"what": "score_sweep", "H": h, "d": d, "L": length, **cfg, "ms": ms, "tflops": tf})
        print(f"score H={h} d={d} L={length} {bq},{bk},{nw},{ns}: {ms:.3f} ms {tf:.0f} TFLOPS", flush=True)
        if tf > best[0]:
            best = (tf, cfg)
    return best


def bench_end_to_end(h: int, d: int, k: int, length: int, impls: list[str], sample_ranks: list[int],
                     results: list[dict]) -> None:
    """Per selection impl (``kt.SELECT_IMPL``; the filtered one once per ``tf.SAMPLE_RANK`` in ``sample_ranks``):
    the whole op (CUDA-event median), its phases, its peak memory."""
    inp = fp8_indexer_inputs(length, h, d, seed=1)
    rep = 1000 if length <= 32768 else 1  # beyond 32K a call takes ≥ 100 ms: one timed call (+ 5 to estimate)
    flops = indexer_flops(length, length, h, d)
    qp, kp, wp, ks = kt._prepare(inp.q_index, inp.k_index, inp.weights, inp.k_scale)
    dev = qp.device
    pos = torch.arange(length, device=dev)
    row_len = kt._row_lengths(pos, pos)
    o_s = torch.empty(1, length, k, device=dev)
    o_i = torch.empty(1, length, k, dtype=torch.int32, device=dev)
    runs = [(impl, rank) for impl in impls for rank in (sample_ranks if impl == "filter" else [None])]
    for impl, rank in runs:
        kt.SELECT_IMPL = impl
        default_rank = tf.SAMPLE_RANK
        tf.SAMPLE_RANK = rank or default_rank
        try:
            fn = functools.partial(kt.lightning_indexer_topk, inp.q_index, inp.k_index, inp.weights, k, inp.k_scale)
            peak = peak_extra_gib(fn)  # also the first (compiling) call
            ms = median_ms(fn, rep)
            fallback = int(tf.LAST_FALLBACK) if impl == "filter" else None
            phases = (_workspace_phases if impl == "workspace" else _filter_phases)(
                qp, kp, wp, ks, pos, row_len, k, length, o_s, o_i, rep, h, results)
        finally:
            kt.SELECT_IMPL = "workspace"
            tf.SAMPLE_RANK = default_rank
        label = impl if rank is None else f"filter r={rank} S={_stride_at(rank, k)}"
        row = {"what": "indexer_topk", "impl": label, "H": h, "d": d, "k": k, "L": length, "ms": ms,
               "tflops": flops / ms / 1e9, "score_tflops": flops / phases["score_ms"] / 1e9, "peak_gib": peak,
               "fallback_rows": fallback, **phases}
        results.append(row)
        print(f"{label}: indexer+topk H={h} d={d} k={k} L={length}: {ms:.2f} ms ({row['tflops']:.0f} TFLOPS), "
              f"phases {phases}, fallback rows {fallback}, peak {peak:.2f} GiB", flush=True)


def _stride_at(rank: int, k: int) -> int:
    """The key sampling stride ``tf.sample_stride`` picks for SAMPLE_RANK = ``rank``."""
    default, tf.SAMPLE_RANK = tf.SAMPLE_RANK, rank
    try:
        return tf.sample_stride(k)
    finally:
        tf.SAMPLE_RANK = default


def _workspace_phases(qp, kp, wp, ks, pos, row_len, k, length, o_s, o_i, rep, h, results) -> dict:
    """The workspace path's two phases (score chunks, select+sort chunks), replayed over its own chunking into
    preallocated buffers; at L = 32768 also select-kernel variants (radix only, block sizes)."""
    import triton

    chunk = max(1, min(length, kt.WORKSPACE_ELEMS // length))
    ws = torch.empty(1, chunk, length, device=qp.device)
    cand = torch.empty(1, chunk, 2 * triton.next_power_of_2(k), dtype=torch.int64, device=qp.device)
    counters = torch.zeros(2, 1, chunk, dtype=torch.int32, device=qp.device)  # slot counters, counts; B = 1
    starts = [(st, min(chunk, length - st)) for st in range(0, length, chunk)]

    def scores_only():
        for st, n_q in starts:
            kt.score_chunk(qp, kp, wp, ks, pos, pos, row_len, st, n_q, ws)

    def select_only(fast=True, config=None):
        for st, n_q in starts:
            counters.zero_()
            kt.select_chunk(ws, row_len, counters, cand, o_s, o_i, st, n_q, k, fast, config)

    ms_s, ms_k = median_ms(scores_only, rep), median_ms(select_only, rep)
    if length == 32768:
        for fast, cfg in SELECT_VARIANTS:
            ms_v = median_ms(functools.partial(select_only, fast, cfg), rep)
            results.append({"what": "select_sweep", "H": h, "k": k, "L": length, "fast": fast, "cfg": cfg, "ms": ms_v})
            print(f"select L={length} k={k} fast={fast} {cfg}: {ms_v:.2f} ms", flush=True)
    return {"score_ms": ms_s, "select_ms": ms_k, "threshold_ms": None, "chunk": chunk}


def _filter_phases(qp, kp, wp, ks, pos, row_len, k, length, o_s, o_i, rep, h, results) -> dict:
    """The filtered path's phases over its own chunking: thresholds (sampled scores + their select), filtered
    scores (each chunk with its own thresholds, restored before the call), sort. The sort replays the last chunk's
    candidates for every chunk (its cost does not depend on the values: CAP slots per row). The fallback is the
    whole op's time minus these."""
    plan = tf.FilterPlan(qp, kp, wp, ks, pos, pos, row_len, k, None, o_s, o_i)
    starts = [(st, min(plan.chunk, length - st)) for st in range(0, length, plan.chunk)]
    saved = []
    for st, n_q in starts:
        plan.thresholds(st, n_q)
        saved.append(plan.thr.clone())

    def thresholds():
        for st, n_q in starts:
            plan.thresholds(st, n_q)

    def scores():
        for (st, n_q), thr in zip(starts, saved):
            plan.thr.copy_(thr)
            plan.scores(st, n_q)

    def sort():
        for st, n_q in starts:
            plan.sort(st, n_q)

    return {"score_ms": median_ms(scores, rep), "select_ms": median_ms(sort, rep),
            "threshold_ms": median_ms(thresholds, rep), "chunk": plan.chunk}


def tables(results: list[dict]) -> str:
    """Markdown: end-to-end rows (each impl; "vs workspace" = workspace ms / this row's ms, same run), then the
    score-tile and select sweeps if they ran. Column "select/sort ms": the workspace path's select + sort, the
    filtered path's sort; "threshold ms": the filtered path's sampled scores + their select."""
    e2e = [r for r in results if r["what"] == "indexer_topk"]
    base = {(r["H"], r["d"], r["k"], r["L"]): r["ms"] for r in e2e if r["impl"] == "workspace"}

    def speedup(r: dict) -> str:
        ms = base.get((r["H"], r["d"], r["k"], r["L"]))
        return "—" if ms is None else f"{ms / r['ms']:.2f}×"

    out = [markdown_table(
        ["impl", "H_I", "d_I", "k", "L", "total ms", "TFLOPS", "vs workspace", "scores ms (TFLOPS)",
         "select/sort ms", "threshold ms", "fallback rows", "peak extra GiB", "chunk"],
        [[r["impl"], r["H"], r["d"], r["k"], r["L"], r["ms"], f"{r['tflops']:.0f}", speedup(r),
          f"{r['score_ms']:.2f} ({r['score_tflops']:.0f})", r["select_ms"],
          "—" if r["threshold_ms"] is None else r["threshold_ms"],
          "—" if r["fallback_rows"] is None else r["fallback_rows"], r["peak_gib"], r["chunk"]] for r in e2e])]
    sweep = [r for r in results if r["what"] == "score_sweep"]
    if sweep:
        out.append(markdown_table(
            ["H_I", "d_I", "L", "BLOCK_Q", "BLOCK_K", "warps", "stages", "ms", "TFLOPS"],
            [[r["H"], r["d"], r["L"], r["BLOCK_Q"], r["BLOCK_K"], r["num_warps"], r["num_stages"],
              f"{r['ms']:.3f}" if "ms" in r else r["error"][:60], f"{r['tflops']:.0f}" if "ms" in r else "—"]
             for r in sweep]))
    select = [r for r in results if r["what"] == "select_sweep"]
    if select:
        out.append(markdown_table(["H_I", "k", "L", "fast path", "config", "select ms"],
                                  [[r["H"], r["k"], r["L"], r["fast"], r["cfg"], r["ms"]] for r in select]))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072],
                    help="sequence lengths of the end-to-end rows")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="shapes to time")
    ap.add_argument("--no-sweep", action="store_true", help="skip the score-tile sweep")
    ap.add_argument("--impls", nargs="+", choices=["workspace", "filter"], default=["workspace", "filter"],
                    help="top-k selection paths to time (kernels.indexer_topk.SELECT_IMPL), each in this run")
    ap.add_argument("--sweep-length", type=int, default=16384, help="L of the score-tile sweep")
    ap.add_argument("--sample-rank", type=int, nargs="+", default=[tf.SAMPLE_RANK],
                    help="filtered path: sampled scores aimed above each threshold (sets the key stride); several "
                         "values time the filtered path once per value")
    ap.add_argument("--out", type=Path, default=None, help="write indexer_topk.json / .md here")
    args = ap.parse_args(argv)
    require_cuda("benchmarks/indexer_topk.py")
    meta = {**run_meta(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(meta, flush=True)
    results: list[dict] = []
    if not args.no_sweep:
        for name in args.shapes:
            h, d, _ = SHAPES[name]
            print("best", h, d, sweep_scores(h, d, args.sweep_length, SWEEP[(h, d)], results), flush=True)
    for name in args.shapes:
        h, d, k = SHAPES[name]
        for length in args.lengths:
            bench_end_to_end(h, d, k, length, args.impls, args.sample_rank, results)
    write_results(args.out, "indexer_topk", meta, results, tables(results))


if __name__ == "__main__":
    main()
