"""The sparse attention backward, two launches (dq pass, then dk/dv pass) against one mixed launch.

``kernels.sparse_attention.MIXED_BACKWARD`` interleaves the dq and dk/dv programs of each token in one launch
(``_sparse_attn_bwd_mixed_kernel``): the dk/dv pass is bound by the L2's fp32 atomic rate
(benchmarks/NOTES_sparse_attention.md §7), the dq pass by MMAs and gathers, so mixed they may overlap. This times
both schedules in the same run, with and without the fused KL's ``p_attn`` output, on random causal top-k sets
(the benchmark's own synthetic sets: effectively random keys, the worst case for L2 reuse).

Run: ``python benchmarks/sparse_backward.py [--lengths 32768 131072] [--shapes V3.2 small] [--out DIR]``
(GPU only; prints a markdown table, writes sparse_backward.json / .md under ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, median_ms, require_cuda, run_meta, write_results  # noqa: E402
from benchmarks.attention import SMALL, V32, synthetic_topk  # noqa: E402

SHAPES = {"V3.2": V32, "small": SMALL}


def measure(shape: dict, length: int, rep_ms: float) -> list[dict]:
    from kernels import sparse_attention as ks

    torch.manual_seed(0)
    h, (d_qk, d_v), topk = shape["h"], shape["d_sparse"], shape["topk"]
    q = torch.randn(1, length, h, d_qk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, 1, d_qk, device="cuda", dtype=torch.bfloat16)
    v = k[..., :d_v] if shape["mla"] else torch.randn(1, length, 1, d_v, device="cuda", dtype=torch.bfloat16)
    idx = synthetic_topk(length, topk, "cuda")
    scale = d_qk**-0.5
    out, lse = ks.sparse_attention_fwd(q, k, v, idx, scale)
    grad = out  # its own gradient: at V3.2 128K another [L, H, d_v] tensor is 17 GB
    flops = 2.5 * ks.sparse_attention_flops(length, h, topk, d_qk, d_v)
    p_attn = torch.empty(idx.shape, device="cuda", dtype=torch.float32)
    rows, ref = [], {}
    default = ks.MIXED_BACKWARD
    for with_p in (False, True):
        for mixed in (False, True):
            ks.MIXED_BACKWARD = mixed

            def bwd(with_p=with_p):
                return ks.sparse_attention_bwd(q, k, v, idx, out, lse, grad, scale, p_attn=p_attn if with_p else None)

            try:
                result = bwd()
                # (a strided sample of dq: a full copy is 19 GB at V3.2 128K, and a second live dq would OOM)
                sample = (result[0][:, ::7].clone(), result[1].clone())
                del result
                torch.cuda.synchronize()
                ms = median_ms(bwd, rep_ms)
            except torch.OutOfMemoryError:
                rows.append({"shape": shape["name"], "L": length, "p_attn": with_p, "mixed": mixed, "error": "OOM"})
                continue
            finally:
                ks.MIXED_BACKWARD = default
            # the two schedules compute the same thing: dq bit for bit, dk up to atomic order
            if not mixed:
                ref[with_p] = sample
                same = ""
            else:
                base = ref.get(with_p)
                same = "n/a" if base is None else (
                    f"dq sample equal: {torch.equal(base[0], sample[0])}, dk max diff "
                    f"{(base[1].float() - sample[1].float()).abs().max().item():.2e}")
            rows.append({"shape": shape["name"], "L": length, "p_attn": with_p, "mixed": mixed, "ms": ms,
                         "tflops": flops / ms / 1e9, "check": same})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[32768, 131072])
    parser.add_argument("--shapes", nargs="+", default=["V3.2", "small"], choices=list(SHAPES))
    parser.add_argument("--rep-ms", type=float, default=2000.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    require_cuda("benchmarks/sparse_backward.py")
    results = []
    for name in args.shapes:
        for length in args.lengths:
            results += measure(SHAPES[name], length, args.rep_ms)
            torch.cuda.empty_cache()
    table = markdown_table(["shape", "L", "p_attn", "schedule", "bwd ms", "TFLOPS", "mixed vs two launches"], [
        (r["shape"], f"{r['L'] // 1024}K", r["p_attn"], "mixed" if r["mixed"] else "two launches",
         r.get("ms", r.get("error")), f"{r['tflops']:.1f}" if "tflops" in r else "-", r.get("check", ""))
        for r in results])
    write_results(args.out, "sparse_backward", run_meta(), results, table)


if __name__ == "__main__":
    main()
