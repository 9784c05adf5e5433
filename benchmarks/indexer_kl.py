"""GPU benchmark of the Triton indexer KL losses (kernels/indexer_kl.py; docs/design.md, "Indexer losses").

    python benchmarks/indexer_kl.py [--lengths 8192 ...] [--kinds sparse dense from_target fused]
                                    [--shapes V3.2 small] [--compare-legacy] [--out DIR]

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
The sparse stage in training runs the KL fused into the attention backward; two more kinds time that path, at
the shapes of benchmarks/attention.py (``--shapes``: V3.2 MLA H = 128, 576/512, H_I = 64 × 128, k = 2048; small
H = 16, d = 128, H_I = 8 × 64, k = 2048), bf16 indexer inputs, synthetic causal top-k sets:
- ``from_target``: the indexer passes alone, as the fused backward calls them
  (``indexer_kl_sparse_from_target``): the KL value (forward with the target given) and value + gradients;
  their difference is the indexer-gradient kernel (``bwd ms``; TFLOPS at 3·2·H_I·d_I per valid pair; dk_I
  atomics GB/s at 4·d_I bytes per valid pair);
- ``fused``: plain sparse attention f+b vs ``sparse_attention_with_indexer_kl`` f+b; the difference is what the
  KL adds (the issue's target: ≤ 10 %).
``--v2-sweep`` (from_target) times the v2 kernel once per tile configuration in ``V2_SWEEP``.
``--compare-legacy`` times both backward kernels (``kernels.indexer_kl_backward.KL_BWD_IMPL`` = "v2", "legacy")
in the same run; without it, only the default. Timings of calls ≥ 100 ms use benchmarks/attention.py's
explicit-event medians.
Prints markdown tables (the kernel never falls back to the reference op: a failure raises); with ``--out``
writes ``indexer_kl.json`` and ``indexer_kl.md`` there. Results: benchmarks/NOTES_indexer.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
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
from benchmarks.attention import SMALL, V32, bench_ms, synthetic_topk  # noqa: E402
from kernels import indexer_kl, indexer_kl_backward  # noqa: E402

KINDS = ("sparse", "dense", "from_target", "fused")
SHAPES = {"V3.2": V32, "small": SMALL}
V2_SWEEP = indexer_kl_backward.KL_BWD_V2_SWEEP


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


@contextlib.contextmanager
def kl_backward_impl(impl: str) -> Iterator[None]:
    """Select the indexer-gradient kernel (``kernels.indexer_kl_backward.KL_BWD_IMPL``) inside the block."""
    saved, indexer_kl_backward.KL_BWD_IMPL = indexer_kl_backward.KL_BWD_IMPL, impl
    try:
        yield
    finally:
        indexer_kl_backward.KL_BWD_IMPL = saved


def _target(idx: torch.Tensor) -> torch.Tensor:
    """A KL target on the slots: per row a softmax over its valid slots (0 on −1 slots), as p_attn looks."""
    logits = (torch.randn(idx.shape, device="cuda") * 2).masked_fill(idx < 0, float("-inf"))
    return torch.softmax(logits, -1).nan_to_num_(0.0)


def bench_from_target(shape: dict, length: int, impls: list[str], v2_tiles: list[dict] = ()) -> list[dict]:
    """The fused path's indexer passes alone: KL value, and value + gradients, per backward kernel (v2 once per
    entry of ``v2_tiles`` when given: block_n / num_warps / num_stages, see ``KL_BWD_V2_TILES``)."""
    hi, di, topk = shape["hi"], shape["di"], shape["topk"]
    torch.manual_seed(0)
    qi = torch.randn(1, length, hi, di, device="cuda", dtype=torch.bfloat16)
    ki = torch.randn(1, length, di, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1, length, hi, device="cuda") / (hi * di) ** 0.5
    idx = synthetic_topk(length, topk, "cuda")
    target = _target(idx)
    grad = torch.ones((), device="cuda")
    pairs = (idx >= 0).sum().item()
    value_ms = bench_ms(lambda: indexer_kl.indexer_kl_sparse_from_target(target, qi, ki, w, None, idx, None))[0]
    runs = [(impl, None) for impl in impls if impl != "v2" or not v2_tiles]
    runs += [("v2", tiles) for tiles in v2_tiles if "v2" in impls]
    rows = []
    for impl, tiles in runs:
        saved = dict(indexer_kl_backward.KL_BWD_V2_TILES)
        indexer_kl_backward.KL_BWD_V2_TILES.update(tiles or {})
        try:
            with kl_backward_impl(impl):
                both = bench_ms(lambda: indexer_kl.indexer_kl_sparse_from_target(target, qi, ki, w, None, idx,
                                                                                 grad))[0]
        finally:
            indexer_kl_backward.KL_BWD_V2_TILES.update(saved)
        bwd = max(both - value_ms, 1e-9)
        label = impl if tiles is None else f"v2 {tiles['block_n']}/{tiles['num_warps']}/{tiles['num_stages']}"
        rows.append({"what": "kl_from_target", "shape": shape["name"], "L": length, "H_I": hi, "d_I": di, "k": topk,
                     "impl": label, "value_ms": value_ms, "value_grad_ms": both, "bwd_ms": bwd,
                     "bwd_tflops": pairs * 6 * hi * di / bwd / 1e9, "dk_atomic_gbs": pairs * 4 * di / bwd / 1e6})
    return rows


def bench_fused(shape: dict, length: int, impls: list[str]) -> list[dict]:
    """Plain sparse attention f+b against the same with the KL fused into its backward, per backward kernel."""
    from kernels.sparse_attention import sparse_attention
    from kernels.sparse_attention_kl import sparse_attention_with_indexer_kl

    h, (dqk, dv), hi, di, topk = shape["h"], shape["d_sparse"], shape["hi"], shape["di"], shape["topk"]
    torch.manual_seed(0)

    def rnd(*size, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*size, device="cuda") * scale).to(dtype).requires_grad_()

    q, kv = rnd(1, length, h, dqk), rnd(1, length, 1, dqk)
    v_sep = None if shape["mla"] else rnd(1, length, 1, dv)
    qi, ki = rnd(1, length, hi, di), rnd(1, length, di)
    w = rnd(1, length, hi, dtype=torch.float32, scale=(hi * di) ** -0.5)
    leaves = [x for x in (q, kv, v_sep, qi, ki, w) if x is not None]
    idx = synthetic_topk(length, topk, "cuda")

    def values():
        return kv[..., :dv] if v_sep is None else v_sep

    def plain():
        out, _ = sparse_attention(q, kv, values(), idx)
        out.backward(out.detach())
        for x in leaves:
            x.grad = None

    def fused():
        out, _, proxy, _ = sparse_attention_with_indexer_kl(q, kv, values(), idx, None, qi, ki, w)
        torch.autograd.backward([out, proxy], [out.detach(), torch.ones_like(proxy)])
        for x in leaves:
            x.grad = None

    plain_ms = bench_ms(plain)[0]
    rows = []
    for impl in impls:
        with kl_backward_impl(impl):
            fused_ms = bench_ms(fused)[0]
        rows.append({"what": "fused_kl", "shape": shape["name"], "L": length, "H": h, "d": dqk, "H_I": hi, "d_I": di,
                     "k": topk, "impl": impl, "sparse_fwd_bwd_ms": plain_ms, "fused_fwd_bwd_ms": fused_ms,
                     "kl_ms": fused_ms - plain_ms, "kl_pct": 100.0 * (fused_ms - plain_ms) / plain_ms})
    return rows


def table(results: list[dict]) -> str:
    parts = []
    old = [r for r in results if r["what"] in ("kl_sparse", "kl_dense")]
    if old:
        parts.append(table_losses(old))
    rows = [r for r in results if r["what"] == "kl_from_target"]
    if rows:
        parts.append(markdown_table(
            ["indexer passes (fused path)", "L", "impl", "KL value ms", "value + grads ms", "bwd ms", "bwd TFLOPS",
             "dk_I atomics GB/s"],
            [[f"{r['shape']}: H_I {r['H_I']} × {r['d_I']}, k {r['k']}", r["L"], r["impl"], r["value_ms"],
              r["value_grad_ms"], r["bwd_ms"], f"{r['bwd_tflops']:.0f}", f"{r['dk_atomic_gbs']:.0f}"] for r in rows]))
    rows = [r for r in results if r["what"] == "fused_kl"]
    if rows:
        parts.append(markdown_table(
            ["sparse attention + fused KL", "L", "impl", "sparse f+b ms", "with fused KL ms", "KL adds ms",
             "KL adds %"],
            [[f"{r['shape']}: H {r['H']}, d {r['d']}, H_I {r['H_I']} × {r['d_I']}, k {r['k']}", r["L"], r["impl"],
              r["sparse_fwd_bwd_ms"], r["fused_fwd_bwd_ms"], r["kl_ms"], f"{r['kl_pct']:+.1f}"] for r in rows]))
    return "\n\n".join(parts)


def table_losses(results: list[dict]) -> str:
    return markdown_table(
        ["kind", "impl", "H / H_kv, d", "H_I, d_I", "k", "L", "fwd ms", "fwd TFLOPS", "fwd+bwd ms", "bwd TFLOPS",
         "peak extra GiB"],
        [[r["what"], r["impl"], f"{r['H']} / {r['H_kv']}, {r['d']}", f"{r['H_I']}, {r['d_I']}", r["k"] or "—", r["L"],
          r["fwd_ms"], f"{r['fwd_tflops']:.0f}", r["fwd_bwd_ms"],
          f"{r['bwd_tflops']:.0f}" if "bwd_tflops" in r else "—", r["peak_gib"]] for r in results])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192], help="sequence lengths")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=["sparse", "dense"],
                    help="what to time: the separate losses (sparse, dense), the fused path's indexer passes "
                         "(from_target), sparse attention f+b with and without the fused KL (fused)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                    help="shapes of the from_target and fused kinds")
    ap.add_argument("--compare-legacy", action="store_true",
                    help="time the legacy indexer-gradient kernel too, in the same run")
    ap.add_argument("--v2-sweep", action="store_true",
                    help="from_target: time the v2 kernel with each of V2_SWEEP's tiles (keys/warps/stages)")
    ap.add_argument("--out", type=Path, default=None, help="write indexer_kl.json / .md here")
    args = ap.parse_args(argv)
    require_cuda("benchmarks/indexer_kl.py")
    meta = {**run_meta(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(meta, flush=True)
    impls = ["v2", "legacy"] if args.compare_legacy else [indexer_kl_backward.KL_BWD_IMPL]
    results = []
    for kind in args.kinds:
        for length in args.lengths:
            if kind in ("sparse", "dense"):
                for impl in impls:
                    with kl_backward_impl(impl):
                        results.append({**(bench_sparse if kind == "sparse" else bench_dense)(length), "impl": impl})
                    print(results[-1], flush=True)
                continue
            for name in args.shapes:
                if kind == "from_target":
                    rows = bench_from_target(SHAPES[name], length, impls, V2_SWEEP if args.v2_sweep else ())
                else:
                    rows = bench_fused(SHAPES[name], length, impls)
                for row in rows:
                    results.append(row)
                    print(row, flush=True)
    write_results(args.out, "indexer_kl", meta, results, table(results))


if __name__ == "__main__":
    main()
