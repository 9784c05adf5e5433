"""Scatter-add throughput on the GPU: the ceiling of the sparse backward's fp32 atomics.

The sparse attention's dK/dV pass and the indexer-KL backward add one fp32 row per (query, selected key) into
the key's gradient row with ``tl.atomic_add``: random rows, contiguous d. This measures how fast that pattern
can go on this GPU, for the layouts the kernels produce, so their notes can state how close to it they run:

- ``blocked``: the values in Triton's default blocked layout (each thread holds 4 contiguous d) → vector red;
- ``mma``: the values straight from a ``tl.dot`` (Hopper MMA layout: 2 contiguous d per thread) → .v2;
- ``transposed``: [d, keys] with d on dim 0 (as the indexer-KL backward's dk_I today) → scalar atomics;
- ``store``: the same scatter as plain stores (no read-modify-write): the memory system's own scatter rate;
- ``index_add``: ``torch.Tensor.index_add_`` over the same rows (PyTorch's own scatter-add).

Each launch adds ``pairs`` rows of ``d`` fp32 into ``keys`` random rows; GB/s counts 4·d bytes per pair (the
payload, not the read-modify-write traffic in L2). The PTX of each Triton variant is scanned for its
reduction instructions (``red``/``atom`` forms), so the table shows which vector width each layout got.

Run: ``python benchmarks/atomics.py [--d 576 128] [--pairs 2097152] [--keys 131072] [--out DIR]``
(GPU only; prints a markdown table, writes atomics.json / atomics.md under ``--out``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, median_ms, require_cuda, run_meta, write_results  # noqa: E402


@triton.jit
def _scatter_kernel(out_ptr, idx_ptr, n_pairs, D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
                    LAYOUT: tl.constexpr):
    """Rows ``pid·BLOCK_N …`` of pairs: out[idx[p], :] += value(p, :) in the layout named by LAYOUT."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < n_pairs
    rows = tl.load(idx_ptr + offs_n, mask=nmask, other=0).to(tl.int64)
    CW: tl.constexpr = 128 if DP > 128 else DP
    for c in range(0, D, CW):
        offs_d = c + tl.arange(0, CW)
        dmask = offs_d < D
        if LAYOUT == 0 or LAYOUT == 3:  # blocked values (0: atomics, 3: plain stores)
            val = (offs_n[:, None] + offs_d[None, :]).to(tl.float32) * 1e-3
            ptrs = out_ptr + rows[:, None] * D + offs_d[None, :]
            if LAYOUT == 0:
                tl.atomic_add(ptrs, val, mask=nmask[:, None] & dmask[None, :], sem="relaxed")
            else:
                tl.store(ptrs, val, mask=nmask[:, None] & dmask[None, :])
        elif LAYOUT == 1:  # values from an MMA: [BLOCK_N, 16] @ [16, CW]
            a = (offs_n[:, None] + tl.arange(0, 16)[None, :]).to(tl.float16)
            b = (tl.arange(0, 16)[:, None] + offs_d[None, :]).to(tl.float16)
            val = tl.dot(a, b) * 1e-3
            tl.atomic_add(out_ptr + rows[:, None] * D + offs_d[None, :], val,
                          mask=nmask[:, None] & dmask[None, :], sem="relaxed")
        else:  # transposed MMA output [CW, BLOCK_N]: d on dim 0
            a = (offs_d[:, None] + tl.arange(0, 16)[None, :]).to(tl.float16)
            b = (tl.arange(0, 16)[:, None] + offs_n[None, :]).to(tl.float16)
            val = tl.dot(a, b) * 1e-3
            tl.atomic_add(out_ptr + rows[None, :] * D + offs_d[:, None], val,
                          mask=nmask[None, :] & dmask[:, None], sem="relaxed")


LAYOUTS = {"blocked": 0, "mma": 1, "transposed": 2, "store": 3}


def reduction_forms(ptx: str) -> dict[str, int]:
    """Counts of the global reduction/atomic instruction forms in a PTX listing, e.g. {'red.v4.f32': 3}."""
    forms: dict[str, int] = {}
    for m in re.finditer(r"\b(red|atom)\.([a-z0-9_.]+)", ptx):
        parts = m.group(2).split(".")
        vec = next((p for p in parts if re.fullmatch(r"v[248]", p)), "")
        dtype = next((p for p in parts if p in ("f32", "f16", "bf16", "f16x2", "bf16x2", "u32", "s32", "u64")), "?")
        key = ".".join(x for x in (m.group(1), vec, dtype) if x)
        forms[key] = forms.get(key, 0) + 1
    return forms


def _ptx_of(launch_result) -> str:
    """PTX of a launched Triton kernel (the launch returns the compiled kernel in Triton 3.x)."""
    try:
        return launch_result.asm["ptx"]
    except (AttributeError, KeyError, TypeError):
        return ""


def measure(d: int, pairs: int, keys: int, rep_ms: float) -> list[dict]:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    idx = torch.randint(0, keys, (pairs,), device=dev, dtype=torch.int32)
    out = torch.zeros(keys, d, device=dev, dtype=torch.float32)
    payload_gb = pairs * d * 4 / 1e9
    block_n = 64
    grid = (triton.cdiv(pairs, block_n),)
    rows = []
    for name, code in LAYOUTS.items():
        compiled = _scatter_kernel[grid](out, idx, pairs, D=d, DP=triton.next_power_of_2(d), BLOCK_N=block_n,
                                         LAYOUT=code, num_warps=4)
        ms = median_ms(lambda code=code: _scatter_kernel[grid](out, idx, pairs, D=d, DP=triton.next_power_of_2(d),
                                                                BLOCK_N=block_n, LAYOUT=code, num_warps=4), rep_ms)
        forms = reduction_forms(_ptx_of(compiled))
        rows.append({"variant": name, "d": d, "pairs": pairs, "keys": keys, "ms": ms, "payload_GB": payload_gb,
                     "GB_per_s": payload_gb / (ms / 1e3), "G_elems_per_s": pairs * d / (ms / 1e3) / 1e9,
                     "ptx_reductions": forms})
    src = torch.ones(pairs, d, device=dev, dtype=torch.float32)
    ms = median_ms(lambda: out.index_add_(0, idx, src), rep_ms)
    rows.append({"variant": "index_add", "d": d, "pairs": pairs, "keys": keys, "ms": ms, "payload_GB": payload_gb,
                 "GB_per_s": payload_gb / (ms / 1e3), "G_elems_per_s": pairs * d / (ms / 1e3) / 1e9,
                 "ptx_reductions": {}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", nargs="+", type=int, default=[576, 128])
    parser.add_argument("--pairs", type=int, default=2 * 2**20)
    parser.add_argument("--keys", type=int, default=128 * 1024)
    parser.add_argument("--rep-ms", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    require_cuda("benchmarks/atomics.py")
    results = []
    for d in args.d:
        results += measure(d, args.pairs, args.keys, args.rep_ms)
    headers = ["variant", "d", "pairs", "keys", "ms", "payload GB/s", "G elem/s", "PTX reductions"]
    table = markdown_table(headers, [
        (r["variant"], r["d"], r["pairs"], r["keys"], r["ms"], f"{r['GB_per_s']:.0f}", f"{r['G_elems_per_s']:.1f}",
         " ".join(f"{k}×{v}" for k, v in sorted(r["ptx_reductions"].items())) or "-") for r in results])
    print(run_meta())
    write_results(args.out, "atomics", run_meta(), results, table)


if __name__ == "__main__":
    main()
