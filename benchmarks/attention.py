"""Single-GPU attention benchmark: cuDNN dense causal attention vs the DSA layer (docs/design.md#performance-targets).

    python benchmarks/attention.py --out DIR [--quick] [--sweep]

Shapes: V3.2 (dense MHA H=128, d_qk 192 / d_v 128; DSA = FP8 indexer H_I=64, d_I=128 + top-k 2048 + sparse MLA
H=128, 576/512 with v = latent[..., :512] + sparse KL) and a small model (H=16, d=128 MQA, H_I=8, d_I=64).
Each DSA part (FP8 quant, indexer+top-k, sparse attention, KL) is timed alone and the chain together, forward
and forward+backward; the sparse KL both as the separate op and fused into the attention backward
(``sparse_attention_with_indexer_kl``, what the training layer runs), with the fused KL's overhead over the plain
sparse attention forward+backward. Timings are CUDA-event medians; peak memory is ``max_memory_allocated`` after
a reset with only that measurement's inputs alive. Kernels of the other families are imported lazily: a missing
or failing one is recorded as "n/a: reason". Writes ``results.json`` and ``results.md`` under ``--out``.
``--sweep`` instead times tile configurations of the sparse attention kernel (for NOTES_sparse_attention.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import sparse_attention as ksa  # noqa: E402

GB = 1024**3
V32 = dict(name="V3.2", h=128, d_dense=(192, 128), d_sparse=(576, 512), mla=True, hi=64, di=128, topk=2048)
SMALL = dict(name="small", h=16, d_dense=(128, 128), d_sparse=(128, 128), mla=False, hi=8, di=64, topk=2048)


# ------------------------------------------------------------------------------------------------ timing


def bench_ms(fn, max_reps: int = 20) -> tuple[float, float | None]:
    """(median ms, peak GB or None) of ``fn`` by CUDA events. Short calls go through triton's do_bench; long
    ones (≥ 100 ms, where do_bench's fixed 5-call estimate alone would cost seconds) through a few explicitly
    timed calls, whose peak memory is read on the way (saves a separate call at 128K)."""
    import triton

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()  # warm-up: compilation, autotune caches, allocator
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    if first < 100:
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")), None
    reps = max(2, min(max_reps, int(3000 / first)))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / GB


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GB


def measure(fn, flops: float | None = None) -> dict:
    """{"ms", "tflops", "peak_gb"} or {"error": "OOM" | "n/a: ..."}."""
    try:
        ms, mem = bench_ms(fn)
        if mem is None:
            mem = peak_gb(fn)  # do_bench's own L2-flush buffer would inflate the peak: measure apart
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as exc:  # a kernel of another family may be missing or broken: record, carry on
        traceback.print_exc()
        return {"error": f"n/a: {type(exc).__name__}: {str(exc)[:120]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    out = {"ms": ms, "peak_gb": mem}
    if flops:
        out["tflops"] = flops / ms / 1e9
    return out


def lazy(module: str, name: str):
    """The kernel ``kernels.<module>.<name>``, or a string saying why it is unavailable."""
    try:
        mod = __import__(f"kernels.{module}", fromlist=[name])
        return getattr(mod, name)
    except Exception as exc:
        return f"n/a: kernels.{module}.{name}: {type(exc).__name__}: {str(exc)[:100]}"


# ------------------------------------------------------------------------------------------------ inputs


def synthetic_topk(length: int, topk: int, device) -> torch.Tensor:
    """Causal top-k sets [1, L, k] int32 without an L×L matrix: stratified random keys (slot j of row t lies in
    [j(t+1)/k, (j+1)(t+1)/k), so keys are distinct), −1 past the t+1 available keys."""
    t = torch.arange(length, device=device)[:, None].float()
    j = torch.arange(topk, device=device)[None, :].float()
    r = torch.rand(length, topk, device=device)
    span = torch.clamp(t + 1, min=topk)
    idx = torch.floor((j + r) * span / topk).long()
    idx = torch.where(idx <= t, idx, -1)
    return idx.int()[None]


def rand(*shape, dtype=torch.bfloat16, grad=False, scale=1.0):
    x = (torch.randn(*shape, device="cuda") * scale).to(dtype)
    return x.requires_grad_(grad)


# ------------------------------------------------------------------------------------------------ dense


def dense_rows(shape: dict, length: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    h, (dqk, dv) = shape["h"], shape["d_dense"]
    res = {}
    try:
        q, k = rand(1, h, length, dqk, grad=True), rand(1, h, length, dqk, grad=True)
        v = rand(1, h, length, dv, grad=True)
    except torch.cuda.OutOfMemoryError:
        return {"fwd": {"error": "OOM"}, "fwd_bwd": {"error": "OOM"}}
    backend = None
    for cand in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(cand):
                sdpa(q[:, :, :256], k[:, :, :256], v[:, :, :256], is_causal=True)
            backend = cand
            break
        except RuntimeError:
            continue
    res["backend"] = str(backend).split(".")[-1]
    flops = 2.0 * h * (dqk + dv) * length * length / 2  # causal pairs

    def fwd():
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=True)

    def fwd_bwd():
        out = fwd()
        out.backward(out.detach())  # grad_out aliases out: no second [L, H, d_v] tensor
        q.grad = k.grad = v.grad = None

    res["fwd"] = measure(fwd, flops)
    res["fwd_bwd"] = measure(fwd_bwd, 3.5 * flops)
    return res


# ------------------------------------------------------------------------------------------------ DSA


KL_FAILED: dict[str, str] = {}  # shape name -> why the KL kernel failed there (it raises, never falls back)


def kl_probe(fn) -> str | None:
    """Run ``fn`` once; the reason if it raised, else None."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:100]}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return None


def dsa_rows(shape: dict, length: int) -> dict:
    h, (dqk, dv), topk, hi, di = shape["h"], shape["d_sparse"], shape["topk"], shape["hi"], shape["di"]
    res: dict = {}
    quant = lazy("fp8_quant", "fp8_block_quant")
    indexer = lazy("indexer_topk", "lightning_indexer_topk")
    kl_sparse = lazy("indexer_kl", "indexer_kl_loss_sparse")
    fused = lazy("sparse_attention_kl", "sparse_attention_with_indexer_kl")
    try:
        q = rand(1, length, h, dqk, grad=True)
        kv = rand(1, length, 1, dqk, grad=True)
        v_sep = None if shape["mla"] else rand(1, length, 1, dv, grad=True)
        q_index = rand(1, length, hi, di, grad=True)
        k_index = rand(1, length, di, grad=True)
        weights = rand(1, length, hi, dtype=torch.float32, grad=True, scale=1 / math.sqrt(hi * di))
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}

    def values():
        return kv[..., :dv] if v_sep is None else v_sep

    # ---- FP8 quant + indexer top-k (no backward: indices are discrete; the KL trains the indexer)
    def quantize():
        q8, qs = quant(q_index.detach(), di)
        k8, ks = quant(k_index.detach(), di)
        return q8, k8, weights.detach() * qs.squeeze(-1), ks.squeeze(-1)

    def index_topk(prep):
        return indexer(*prep[:3], topk, prep[3])[1]

    idx_source = "synthetic"
    prep = None
    if callable(quant):
        res["quant"] = measure(quantize)
    else:
        res["quant"] = {"error": quant}
    if callable(quant) and callable(indexer):
        try:
            prep = quantize()
            res["indexer_topk"] = measure(lambda: index_topk(prep), 2.0 * hi * di * length * (length + 1) / 2)
            idx = index_topk(prep)
            idx_source = "indexer"
        except torch.cuda.OutOfMemoryError:
            res["indexer_topk"] = {"error": "OOM"}
        except Exception as exc:
            res["indexer_topk"] = {"error": f"n/a: {type(exc).__name__}: {str(exc)[:120]}"}
    else:
        res["indexer_topk"] = {"error": indexer if not callable(indexer) else "n/a: needs fp8_quant"}
    if idx_source == "synthetic":
        idx = synthetic_topk(length, topk, "cuda")
    res["topk_source"] = idx_source

    # ---- sparse attention
    flops = ksa.sparse_attention_flops(length, h, topk, dqk, dv)

    def sparse_fwd():
        return ksa.sparse_attention(q, kv, values(), idx)

    def sparse_fwd_bwd():
        out, _ = sparse_fwd()
        out.backward(out.detach())
        q.grad = kv.grad = None
        if v_sep is not None:
            v_sep.grad = None

    res["sparse_fwd"] = measure(sparse_fwd, flops)
    res["sparse_fwd_bwd"] = measure(sparse_fwd_bwd, 3.5 * flops)
    if "ms" in res["sparse_fwd"] and "ms" in res["sparse_fwd_bwd"]:
        bwd_ms = res["sparse_fwd_bwd"]["ms"] - res["sparse_fwd"]["ms"]
        res["sparse_bwd"] = {"ms": bwd_ms, "tflops": 2.5 * flops / bwd_ms / 1e9}

    # ---- sparse attention with the KL fused into its backward (target = head-summed P of the dq pass)
    def fused_fwd_bwd():
        out, _, proxy, _ = fused(q, kv, values(), idx, None, q_index, k_index, weights)
        torch.autograd.backward([out, proxy], [out.detach(), torch.ones_like(proxy)])
        for t in (q, kv, v_sep, q_index, k_index, weights):
            if t is not None:
                t.grad = None

    reason = fused if not callable(fused) else kl_probe(fused_fwd_bwd)
    if reason:
        res["fused_kl_fwd_bwd"] = {"error": reason if reason.startswith("n/a") else f"n/a: {reason}"}
    else:
        res["fused_kl_fwd_bwd"] = measure(fused_fwd_bwd)
        if "ms" in res["fused_kl_fwd_bwd"] and "ms" in res["sparse_fwd_bwd"]:
            extra = res["fused_kl_fwd_bwd"]["ms"] - res["sparse_fwd_bwd"]["ms"]
            res["fused_kl_overhead"] = {"ms": extra, "pct": 100.0 * extra / res["sparse_fwd_bwd"]["ms"]}

    # ---- sparse KL as a separate op (target rebuilt from q, k and the sparse attention's lse)
    if callable(kl_sparse):
        with torch.no_grad():
            lse = sparse_fwd()[1]

        def kl_fwd():
            return kl_sparse(q, kv, q_index, k_index, weights, idx, attn_lse=lse)

        def kl_fwd_bwd():
            kl_fwd().backward()
            q_index.grad = k_index.grad = weights.grad = None

        reason = KL_FAILED.get(shape["name"]) or kl_probe(kl_fwd_bwd)
        if reason:  # the kernel failed on this shape: report it, time nothing
            KL_FAILED[shape["name"]] = reason
            res["kl_fwd"] = res["kl_fwd_bwd"] = {"error": f"n/a: KL kernel failed ({reason})"}
        else:
            res["kl_fwd"] = measure(kl_fwd)
            res["kl_fwd_bwd"] = measure(kl_fwd_bwd)
        del lse
    else:
        res["kl_fwd"] = res["kl_fwd_bwd"] = {"error": kl_sparse}

    # ---- the whole layer: every part that exists (the table says which ones ran)
    if idx_source == "indexer":
        # The training layer's KL: fused into the attention backward where that kernel works, else the separate op
        # (a KL kernel that failed above is left out).
        with_fused = "ms" in res["fused_kl_fwd_bwd"]
        with_kl = with_fused or (callable(kl_sparse) and "ms" in res["kl_fwd_bwd"])

        def layer(backward: bool):
            prep_ = quantize()
            idx_ = index_topk(prep_)
            if with_fused:
                out, _, proxy, _ = fused(q, kv, values(), idx_, None, q_index, k_index, weights)
                outs, grads = [out, proxy], [out.detach(), torch.ones_like(proxy)]
            else:
                out, lse_ = ksa.sparse_attention(q, kv, values(), idx_)
                outs, grads = [out], [out.detach()]
            if with_kl and not with_fused:
                outs.append(kl_sparse(q, kv, q_index, k_index, weights, idx_, attn_lse=lse_.detach()))
                grads.append(None)
            if backward:
                torch.autograd.backward(outs, grads)
                for t in (q, kv, v_sep, q_index, k_index, weights):
                    if t is not None:
                        t.grad = None

        res["dsa_parts"] = "quant+indexer_topk+sparse" + (
            "+kl fused into the attention backward (the forward has no KL work)" if with_fused
            else "+kl" if with_kl else " (KL kernel n/a)")
        res["dsa_fwd"] = measure(lambda: layer(False))
        res["dsa_fwd_bwd"] = measure(lambda: layer(True))
    else:
        why = "n/a: needs the indexer_topk and fp8_quant kernels"
        res["dsa_fwd"] = res["dsa_fwd_bwd"] = {"error": why}
    return res


# ------------------------------------------------------------------------------------------------ report


def fmt(cell: dict | None, key: str = "ms") -> str:
    if not cell:
        return "—"
    if "error" in cell:
        return cell["error"].split(":")[0] if cell["error"].startswith("n/a") else cell["error"]
    return f"{cell[key]:.1f}" if key in cell else "—"


def ratio(a: dict | None, b: dict | None) -> str:
    if a and b and "ms" in a and "ms" in b:
        return f"{a['ms'] / b['ms']:.2f}×"
    return "—"


def fused_cell(s: dict) -> str:
    """Sparse attention f+b with the fused KL, and what the KL adds to the plain sparse f+b (ms and %)."""
    extra = s.get("fused_kl_overhead")
    if not extra:
        return fmt(s.get("fused_kl_fwd_bwd"))
    return f"{fmt(s['fused_kl_fwd_bwd'])} (+{extra['ms']:.1f} ms, {extra['pct']:+.1f}%)"


def table(results: list[dict]) -> str:
    lines = [
        "| shape | L | dense fwd ms | DSA fwd ms | fwd speedup | dense f+b ms | DSA f+b ms | f+b speedup "
        "| peak GB dense / DSA (f+b) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, s = r["dense"], r["dsa"]
        lines.append(
            f"| {r['shape']} | {r['L'] // 1024}K | {fmt(d.get('fwd'))} | {fmt(s.get('dsa_fwd'))} | "
            f"{ratio(d.get('fwd'), s.get('dsa_fwd'))} | {fmt(d.get('fwd_bwd'))} | {fmt(s.get('dsa_fwd_bwd'))} | "
            f"{ratio(d.get('fwd_bwd'), s.get('dsa_fwd_bwd'))} | "
            f"{fmt(d.get('fwd_bwd'), 'peak_gb')} / {fmt(s.get('dsa_fwd_bwd'), 'peak_gb')} |"
        )
    lines += [
        "",
        "| shape | L | quant ms | indexer+top-k ms (TFLOPS) | sparse fwd ms (TFLOPS) | sparse bwd ms (TFLOPS) "
        "| sparse f+b peak GB | KL fwd ms | KL f+b ms | sparse f+b with fused KL ms (overhead) | top-k from |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["dsa"]
        if "error" in s:
            lines.append(f"| {r['shape']} | {r['L'] // 1024}K | {s['error']} ||||||||| ")
            continue

        def ft(c):
            return f"{fmt(c)} ({fmt(c, 'tflops')})" if c and "ms" in c else fmt(c)

        lines.append(
            f"| {r['shape']} | {r['L'] // 1024}K | {fmt(s.get('quant'))} | {ft(s.get('indexer_topk'))} | "
            f"{ft(s.get('sparse_fwd'))} | {ft(s.get('sparse_bwd'))} | {fmt(s.get('sparse_fwd_bwd'), 'peak_gb')} | "
            f"{fmt(s.get('kl_fwd'))} | {fmt(s.get('kl_fwd_bwd'))} | {fused_cell(s)} | {s.get('topk_source')} |"
        )
    notes = sorted({f"- {r['dense'].get('backend')}: dense backend used" for r in results})
    notes += sorted(
        {f"- DSA layer ({r['shape']}) = {r['dsa']['dsa_parts']}" for r in results if "dsa_parts" in r["dsa"]}
    )
    errors = sorted(
        {f"- {k}: {c['error']}" for r in results for k, c in r["dsa"].items() if isinstance(c, dict) and "error" in c}
    )
    return "\n".join(lines + [""] + notes + errors)


# ------------------------------------------------------------------------------------------------ sweep


def sweep(lengths: list[int]) -> list[dict]:
    """Time tile configs of the sparse kernels on the V3.2 MLA shape: forward, dq pass, dk/dv pass."""
    h, (dqk, dv), topk = V32["h"], V32["d_sparse"], V32["topk"]
    C = ksa.KernelConfig
    fwd_cfgs = [C(64, 64, 8, 2)]
    dq_cfgs = [C(64, 64, 8, 1), C(64, 32, 8, 1)]
    dkv_cfgs = [
        C(128, 64, 8, 2),
        C(64, 64, 8, 2),
        C(128, 128, 8, 2),
        C(128, 64, 4, 2),
        C(128, 64, 8, 3),
        C(128, 32, 4, 2),
    ]
    rows = []

    def one_length(length: int, full: bool) -> None:
        q = rand(1, length, h, dqk)
        kv = rand(1, length, 1, dqk)
        v = kv[..., :dv]
        idx = synthetic_topk(length, topk, "cuda")
        scale = dqk**-0.5
        flops = ksa.sparse_attention_flops(length, h, topk, dqk, dv)
        out, lse = ksa.sparse_attention_fwd(q, kv, v, idx, scale)
        g = torch.randn_like(out)

        def fwd(cfg):
            return ksa.sparse_attention_fwd(q, kv, v, idx, scale, cfg)

        def bwd(needs, cfg=None):
            return ksa.sparse_attention_bwd(q, kv, v, idx, out, lse, g, scale, needs, cfg)

        base = ksa.default_bwd_config(h, dqk, dv)
        cases = [("bwd default", None, lambda: bwd((True, True, True)), 2.5 * flops)]
        if full:
            cases += [("fwd", c, (lambda c=c: fwd(c)), flops) for c in fwd_cfgs]
            cases += [("bwd dq", c, (lambda c=c: bwd((True, False, False), ksa.BwdConfig(c, base.dkv))), None)
                      for c in dq_cfgs]  # fmt: skip
            cases += [("bwd dkv", c, (lambda c=c: bwd((False, True, True), ksa.BwdConfig(base.dq, c))), None)
                      for c in dkv_cfgs]  # fmt: skip
        else:
            cases += [("fwd", fwd_cfgs[0], lambda: fwd(fwd_cfgs[0]), flops)]
        for name, cfg, fn, fl in cases:
            rows.append({"L": length, "pass": name, "cfg": str(cfg), **measure(fn, fl)})
            print(rows[-1], flush=True)

    for i, length in enumerate(lengths):
        one_length(length, full=i == 0)
    rows.extend(compiled_kernel_report())
    return rows


def compiled_kernel_report() -> list[dict]:
    """Registers, spills and shared memory of every compiled sparse-attention kernel (compiler's report)."""
    out = []
    for fn in (ksa._sparse_attn_fwd_kernel, ksa._sparse_attn_bwd_dq_kernel, ksa._sparse_attn_bwd_dkv_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            for key, kern in cache[0].items():
                md = getattr(kern, "metadata", None)
                row = {
                    "kernel": fn.__name__,
                    "key": str(key)[-420:-80],
                    "n_regs": getattr(kern, "n_regs", None),
                    "n_spills": getattr(kern, "n_spills", None),
                    "shared": getattr(md, "shared", None),
                    "num_warps": getattr(md, "num_warps", None),
                    "num_stages": getattr(md, "num_stages", None),
                }
                out.append(row)
                print(row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="8K and 32K only")
    ap.add_argument("--sweep", action="store_true", help="tile sweep of the sparse kernel instead")
    ap.add_argument("--lengths", type=str, default=None, help="comma list, e.g. 8192,32768")
    ap.add_argument("--shapes", type=str, default="small,V3.2", help="comma list of: small, V3.2")
    ap.add_argument("--budget-s", type=float, default=480, help="start no new (shape, L) row after this")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(meta, flush=True)
    lengths = [8192, 32768] if args.quick else [8192, 32768, 65536, 131072]
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    if args.sweep:
        rows = sweep(lengths)
        (args.out / "sweep.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        return
    results = []
    t_start = time.perf_counter()
    shapes = [sh for sh in (SMALL, V32) if sh["name"] in args.shapes.split(",")]
    for shape in shapes:  # the quick shape first: a run cut short still has it
        for length in lengths:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"skipping {shape['name']} {length}: past --budget-s", flush=True)
                continue
            t0 = time.perf_counter()
            r = {"shape": shape["name"], "L": length, "dense": dense_rows(shape, length)}
            r["dsa"] = dsa_rows(shape, length)
            r["wall_s"] = time.perf_counter() - t0
            results.append(r)
            print(json.dumps(r), flush=True)
            (args.out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    md = table(results)
    (args.out / "results.md").write_text(f"{meta}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
