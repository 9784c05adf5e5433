"""What benchmarks/cp_scaling.py runs: the FLOP counts of its cases, which cases, and which to skip.

Cases are dicts ``part, L, cp, recompute, mode, batch``; :func:`select_cases` gives them in priority order (or
exactly ``--cases``), :func:`skip_reason` says why one is not run (its shorter twin failed, or it is predicted to
exceed the memory or the time budget).
"""

from __future__ import annotations

K = 1024


# ------------------------------------------------------------------------------------------------------- FLOPs
def _attn_flops(cfg, length: int, sparse: bool) -> float:
    """Forward attention FLOPs of one layer over the whole sequence: 2·H·(d_qk + d_v) per (query, key) pair —
    k keys per query (sparse) or the causal half of L² (dense)."""
    pairs = length * cfg.indexer.topk if sparse else length * length / 2
    return 2.0 * cfg.num_heads * (cfg.core_qk_dim + cfg.core_v_dim) * pairs


def _indexer_flops(cfg, length: int) -> float:
    """Indexer scoring (forward only, top-k is not differentiated) + sparse KL (forward, and backward of its
    indexer half): 2·H_I·d_I per causal pair, then k keys per query for the KL's H heads and H_I heads."""
    ix = cfg.indexer
    score = 2.0 * ix.heads * ix.head_dim * length * length / 2
    kl = 2.0 * length * ix.topk * (cfg.num_heads * cfg.core_qk_dim + 3 * ix.heads * ix.head_dim)
    return score + kl


def layer_flops(cfg, length: int, sparse: bool) -> float:
    """One DSA core forward + backward: attention 3.5× forward (backward 2.5×, as benchmarks/attention.py),
    plus the indexer terms of :func:`_indexer_flops` in the sparse stage."""
    return 3.5 * _attn_flops(cfg, length, sparse) + (_indexer_flops(cfg, length) if sparse else 0.0)


def model_flops(cfg, length: int, n_linear_params: int, sparse: bool) -> float:
    """Model forward + backward: 6 · (parameters outside the embeddings) · L for the GEMMs, plus
    :func:`layer_flops` for each layer's core attention."""
    return 6.0 * n_linear_params * length + cfg.num_layers * layer_flops(cfg, length, sparse)


# ------------------------------------------------------------------------------------------------------- cases
def select_cases(args, world: int) -> list[dict]:
    """Cases in priority order (the budget cuts the tail):

    1. the model at ``--compare-length`` for every CP (CP versus DP at the same length);
    2. the 512K targets at the largest CP: the model and the V3.2 layer;
    3. 128K at the largest CP: model, layer, dense model, dense layer (the communication-hiding target);
    4. at the compare length and the largest CP: the other top-k modes, and ``--batch`` sequences (CP=1 too);
    5. everything else, largest CP first, growing lengths.
    """
    if args.cases:
        return [dict(c, mode=args.mode, batch=1) for c in parse_cases(args.cases, world, args.recompute)]
    cps = sorted({c for c in args.cps if world % c == 0}, reverse=True)
    top = cps[0]

    def case(part, length, cp, mode=args.mode, batch=1):
        return dict(part=part, L=length, cp=cp, recompute=args.recompute if part.endswith("model") else "none",
                    mode=mode, batch=batch)

    out = [case("model", args.compare_length, c) for c in sorted(cps)]
    if not args.only_compare:
        out += [case(p, 512 * K, top) for p in ("model", "layer") if p in args.parts]
        out += [case(p, 128 * K, top) for p in args.parts]
    if top > 1:
        out += [case("model", args.compare_length, top, mode=m) for m in args.extra_modes if m != args.mode]
    if args.batch > 1:
        out += [case("model", args.compare_length, c, batch=args.batch) for c in sorted({1, top})]
    if not args.only_compare:
        for cp in cps:
            for part in args.parts:
                for length in sorted(args.model_lengths if part.endswith("model") else args.layer_lengths):
                    out.append(case(part, length, cp))
    unique, keys = [], set()
    for c in out:
        key = tuple(c.values())
        if key not in keys and (c["L"] in args.model_lengths + args.layer_lengths + [args.compare_length]):
            keys.add(key)
            unique.append(c)
    return unique


PARTS = ("model", "layer", "dense_model", "dense_layer")


def parse_cases(specs: list[str], world: int, recompute: str) -> list[dict]:
    """``part:L:CP[:full|none]`` entries (comma- or space-separated) → cases, in the given order.

    ``recompute`` is the default of the model parts (``--recompute``); layer parts have no layers to recompute.
    """
    out = []
    for spec in (x for item in specs for x in item.split(",") if x):
        fields = spec.split(":")
        if len(fields) not in (3, 4) or fields[0] not in PARTS or not fields[1].isdigit() or not fields[2].isdigit():
            raise SystemExit(f"--cases: bad entry {spec!r}; write part:L:CP[:full|none] with part one of {PARTS}, "
                             "e.g. model:524288:4 or model:131072:1:none")
        part, length, cp = fields[0], int(fields[1]), int(fields[2])
        rc = fields[3] if len(fields) == 4 else (recompute if part.endswith("model") else "none")
        if rc not in ("full", "none") or (rc == "full" and not part.endswith("model")):
            raise SystemExit(f"--cases: {spec!r}: the 4th field is 'full' or 'none' ('full' only for model parts)")
        if cp < 1 or world % cp or length % (2 * cp):
            raise SystemExit(f"--cases: {spec!r}: CP={cp} must divide the world size {world} and L must be a "
                             f"multiple of 2*CP")
        out.append(dict(part=part, L=length, cp=cp, recompute=rc))
    return out


def shorter(seen: dict, key: tuple, length: int) -> dict | None:
    """The longest measured row of the same (part, cp, mode, batch) below ``length`` (for predictions)."""
    rows = [r for (k, L), r in seen.items() if k == key and L < length]
    return max(rows, key=lambda r: r["L"]) if rows else None


def skip_reason(case: dict, cfg, last: dict | None, elapsed: float, args) -> str | None:
    """Why a case is not run: its shorter twin failed, or it is predicted to exceed memory or the budget."""
    sparse = not case["part"].startswith("dense")
    grow = 1.0 if last is None else case["L"] / last["L"]
    growth = grow if sparse else grow * grow  # dense attention is quadratic
    if elapsed > args.budget_s:
        return "skipped: budget"
    if last is None:
        flops = (model_flops(cfg, case["L"], 0, sparse) if case["part"].endswith("model")
                 else layer_flops(cfg, case["L"], sparse))
        rate = args.guess_tflops if sparse else args.guess_dense_tflops
        guess = flops / case["cp"] / (rate * 1e12)  # no shorter run to scale from
        if not args.smoke and elapsed + guess * (2 * args.reps + 4) > args.budget_s:
            return f"skipped: budget ({guess:.1f} s/step guessed at {rate:g} TFLOPS)"
        return None
    if "error" in last:
        return "skipped: " + last["error"].removeprefix("skipped: ") + f" at {last['L'] // K}K"
    if last.get("peak_gib", 0) * grow > args.mem_gib:
        return f"skipped: predicted {last['peak_gib'] * grow:.0f} GiB > {args.mem_gib:g}"
    if elapsed + last["step_s"] * growth * (2 * args.reps + 4) > args.budget_s:
        return f"skipped: budget ({last['step_s'] * growth:.1f} s/step predicted)"
    return None
