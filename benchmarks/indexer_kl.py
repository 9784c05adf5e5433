"""GPU benchmark of the Triton indexer KL losses (kernels/indexer_kl.py; docs/design.md, "Indexer losses").

    python benchmarks/indexer_kl.py [--lengths 8192 ...] [--kinds sparse dense] [--out DIR]

Measures, B = 1, causal, random bf16 inputs and a random attention lse standing in for the attention's:
- sparse stage, V3.2 shapes: MLA absorbed (H = 128, d = 576, one KV head), indexer H_I = 64, d_I = 128,
  k = 2048 random causal picks per query (−1 past the t + 1 available keys);
- dense warm-up, small model: H = 16 over 4 KV heads (GQA), d = 128, H_I = 8, d_I = 64.
For each: the forward loss and forward + backward (gradients to q_index, k_index, weights), CUDA-event medians
of ``triton.testing.do_bench(warmup=1, rep=300, return_mode="median")``; then, apart from the timing, the peak
extra memory of one forward + backward (``max_memory_allocated`` after a reset, minus the inputs).
FLOPs: sparse forward 2·(H·d + H_I·d_I) per valid (query, slot) pair (target logits + indexer scores);
sparse backward 3·2·H_I·d_I per pair (indexer gradients only: the target is detached), divided by
(fwd+bwd − fwd) ms; dense forward 2·(H·d + H_I·d_I) per causal pair, L(L+1)/2 pairs (no backward figure).
Prints a markdown table (the kernel never falls back to the reference op: a failure raises); with ``--out``
writes ``indexer_kl.json`` and ``indexer_kl.md`` there. Results: benchmarks/NOTES_indexer.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    markdown_table,
    median_ms,
    peak_extra_gib,
    require_cuda,
    run_meta,
    write_results,
)
from kernels import indexer_kl  # noqa: E402

KINDS = ("sparse", "dense")


def time_fwd_bwd(loss_fn: Callable, leaves: list[torch.Tensor]) -> tuple[float, float, float]:
    """(forward ms, forward + backward ms, peak extra GiB of one forward + backward) of ``loss_fn(*leaves)``."""
    leaves = [x.detach().requires_grad_(True) for x in leaves]
    fwd = median_ms(lambda: loss_fn(*leaves), 300)

    def step():
        for x in leaves:
            x.grad = None
        loss_fn(*leaves).backward()

    both = median_ms(step, 300)
    peak = peak_extra_gib(step)  # after the timing, so the timed calls are the ones benchmarked before
    return fwd, both, peak


def bench_sparse(length: int) -> dict:
    """Sparse KL at the V3.2 shapes: MLA absorbed (H = 128, d = 576, 1 KV head), H_I = 64, d_I = 128, k = 2048."""
    h, d, hi, di, topk = 128, 576, 64, 128, 2048
    torch.manual_seed(0)
    q = torch.randn(1, length, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, 1, d, device="cuda", dtype=torch.bfloat16)
    qi = torch.randn(1, length, hi, di, device="cuda", dtype=torch.bfloat16)
    ki = torch.randn(1, length, di, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1, length, hi, device="cuda") / hi
    rows = torch.arange(length, device="cuda")[:, None] + 1
    idx = (torch.rand(1, length, topk, device="cuda") * rows).long().to(torch.int32)  # random causal picks
    idx = torch.where(torch.arange(topk, device="cuda") < rows, idx, -1)
    lse = torch.randn(1, length, h, device="cuda") + 20.0
    fwd, both, peak = time_fwd_bwd(
        lambda a, c, e: indexer_kl.indexer_kl_loss_sparse(q, k, a, c, e, idx, attn_lse=lse), [qi, ki, w])
    pairs = (idx >= 0).sum().item()
    f_fwd = pairs * 2 * (h * d + hi * di)
    f_bwd = pairs * 2 * 3 * hi * di
    return {"what": "kl_sparse", "L": length, "H": h, "d": d, "H_kv": 1, "H_I": hi, "d_I": di, "k": topk,
            "fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_tflops": f_fwd / fwd / 1e9,
            "bwd_tflops": f_bwd / max(both - fwd, 1e-9) / 1e9, "peak_gib": peak}


def bench_dense(length: int) -> dict:
    """Dense KL warm-up, small model: H = 16 over 4 KV heads, d = 128, H_I = 8, d_I = 64."""
    h, hkv, d, hi, di = 16, 4, 128, 8, 64
    torch.manual_seed(0)
    q = torch.randn(1, length, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, hkv, d, device="cuda", dtype=torch.bfloat16)
    qi = torch.randn(1, length, hi, di, device="cuda", dtype=torch.bfloat16)
    ki = torch.randn(1, length, di, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1, length, hi, device="cuda") / hi
    lse = torch.randn(1, length, h, device="cuda") + 10.0
    fwd, both, peak = time_fwd_bwd(
        lambda a, c, e: indexer_kl.indexer_kl_loss_dense(q, k, a, c, e, attn_lse=lse), [qi, ki, w])
    pairs = length * (length + 1) / 2
    return {"what": "kl_dense", "L": length, "H": h, "d": d, "H_kv": hkv, "H_I": hi, "d_I": di, "k": None,
            "fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_tflops": pairs * 2 * (h * d + hi * di) / fwd / 1e9,
            "peak_gib": peak}


def table(results: list[dict]) -> str:
    return markdown_table(
        ["kind", "H / H_kv, d", "H_I, d_I", "k", "L", "fwd ms", "fwd TFLOPS", "fwd+bwd ms", "bwd TFLOPS",
         "peak extra GiB"],
        [[r["what"], f"{r['H']} / {r['H_kv']}, {r['d']}", f"{r['H_I']}, {r['d_I']}", r["k"] or "—", r["L"],
          r["fwd_ms"], f"{r['fwd_tflops']:.0f}", r["fwd_bwd_ms"],
          f"{r['bwd_tflops']:.0f}" if "bwd_tflops" in r else "—", r["peak_gib"]] for r in results])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192], help="sequence lengths")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="which losses to time")
    ap.add_argument("--out", type=Path, default=None, help="write indexer_kl.json / .md here")
    args = ap.parse_args(argv)
    require_cuda("benchmarks/indexer_kl.py")
    meta = {**run_meta(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(meta, flush=True)
    results = []
    for kind in args.kinds:
        for length in args.lengths:
            results.append((bench_sparse if kind == "sparse" else bench_dense)(length))
            print(results[-1], flush=True)
    write_results(args.out, "indexer_kl", meta, results, table(results))


if __name__ == "__main__":
    main()
