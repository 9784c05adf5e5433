"""What benchmarks/cp_scaling.py runs: the FLOP counts of its cases, which cases, and which to skip.

Cases are dicts ``part, L, cp, recompute, mode, batch``; :func:`select_cases` gives them in priority order (or
exactly ``--cases``), :func:`skip_reason` says why one is not run (its shorter twin failed, or it is predicted to
exceed the memory or the time budget; predictions scale the longest shorter row of this run, or of an earlier
run's results given with ``--prior``).
"""

from __future__ import annotations

import json
from pathlib import Path

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
    if args.cases:  # an entry's own top-k mode (5th field) wins over --mode
        return [{"mode": args.mode, "batch": 1, **c} for c in parse_cases(args.cases, world, args.recompute)]
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


PARTS = ("model", "layer", "attn_layer", "dense_model", "dense_layer")


TOPK_MODES = ("ring", "allgather", "candidates")


def parse_cases(specs: list[str], world: int, recompute: str) -> list[dict]:
    """``part:L:CP[:full|none[:MODE]]`` entries (comma- or space-separated) → cases, in the given order.

    ``recompute`` is the default of the model parts (``--recompute``); layer parts have no layers to recompute.
    ``MODE`` (ring, allgather or candidates) sets the CP top-k exchange of that case alone (default ``--mode``).
    """
    out = []
    for spec in (x for item in specs for x in item.split(",") if x):
        fields = spec.split(":")
        if len(fields) not in (3, 4, 5) or fields[0] not in PARTS or not fields[1].isdigit() \
                or not fields[2].isdigit():
            raise SystemExit(f"--cases: bad entry {spec!r}; write part:L:CP[:full|none[:mode]] with part one of "
                             f"{PARTS}, e.g. model:524288:4, model:131072:1:none or layer:524288:4:none:ring")
        part, length, cp = fields[0], int(fields[1]), int(fields[2])
        rc = fields[3] if len(fields) >= 4 else (recompute if part.endswith("model") else "none")
        if rc not in ("full", "none") or (rc == "full" and not part.endswith("model")):
            raise SystemExit(f"--cases: {spec!r}: the 4th field is 'full' or 'none' ('full' only for model parts)")
        if cp < 1 or world % cp or length % (2 * cp):
            raise SystemExit(f"--cases: {spec!r}: CP={cp} must divide the world size {world} and L must be a "
                             f"multiple of 2*CP")
        case = dict(part=part, L=length, cp=cp, recompute=rc)
        if len(fields) == 5:
            if fields[4] not in TOPK_MODES:
                raise SystemExit(f"--cases: {spec!r}: the 5th field is the top-k mode, one of {TOPK_MODES}")
            case["mode"] = fields[4]
        out.append(case)
    return out


def shorter(seen: dict, key: tuple, length: int, prior: list[dict] | None = None) -> dict | None:
    """The longest measured row of the same (part, cp, mode, batch, recompute) below ``length`` (for predictions).

    Rows of this run come first; without one, the longest shorter row of ``prior`` (results of earlier runs,
    ``--prior``) with the same part, cp, batch and recompute in any top-k mode (the modes' memory differs by the
    gathered FP8 keys, 132 B/token at most) — so a case longer than anything this run measures is still
    predicted from what was measured before.
    """
    rows = [r for (k, L), r in seen.items() if k == key and L < length]
    if not rows and prior:
        part, cp, _mode, batch, recompute = key
        rows = [r for r in prior if (r.get("part"), r.get("cp"), r.get("batch", 1), r.get("recompute", "none"))
                == (part, cp, batch, recompute) and r.get("L", length) < length and "error" not in r]
    return max(rows, key=lambda r: r["L"]) if rows else None


def load_prior(paths: list) -> list[dict]:
    """The result rows of earlier runs (cp_scaling JSON files), each tagged with its file name."""
    rows = []
    for path in paths or []:
        data = json.loads(Path(path).read_text())
        rows += [dict(r, prior=Path(path).name) for r in data["results"]]
    return rows


def steps_per_case(args, step_s: float | None = None) -> int:
    """Steps a case runs (upper bound) at ``step_s`` seconds per step (None: unknown): warm-up, the first timing,
    the timed repetitions (none after a first step of ≥ 1 s, as :func:`benchmarks.cp_scaling.measure` does), then
    either the profiled timeline (``--overlap``: the bytes are counted in the same steps) or the byte count,
    compute alone (warm-up + repetitions) and the replayed collectives."""
    if getattr(args, "overlap", False):
        reps = args.reps if (step_s is None or step_s < 1.0) and args.reps > 1 else 0
        return 2 + reps + args.overlap_steps
    return 2 * args.reps + 4


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
        if not args.smoke and elapsed + guess * steps_per_case(args, guess) > args.budget_s:
            return f"skipped: budget ({guess:.1f} s/step guessed at {rate:g} TFLOPS)"
        return None
    if "error" in last:
        return "skipped: " + last["error"].removeprefix("skipped: ") + f" at {last['L'] // K}K"
    source = f" from {last['L'] / K:g}K" + (f" in {last['prior']}" if "prior" in last else "")
    peak = max(last.get("peak_gib", 0), last.get("peak_first_step_gib", 0))  # the warm-up step runs too
    if peak * grow > args.mem_gib:
        return f"skipped: predicted {peak * grow:.0f} GiB > {args.mem_gib:g}{source}"
    if elapsed + last["step_s"] * growth * steps_per_case(args, last["step_s"] * growth) > args.budget_s:
        return f"skipped: budget ({last['step_s'] * growth:.1f} s/step predicted{source})"
    return None
