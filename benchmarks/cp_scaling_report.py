"""The outputs of benchmarks/cp_scaling.py: the markdown table of its rows and the JSON / markdown files."""

from __future__ import annotations

import json
import os
import time

import torch

K = 1024


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _timeline(r: dict) -> tuple[str, str]:
    """The timeline columns: hidden share (least over ranks) and comm-kernel ms per step (fastest / slowest
    rank; the slowest includes waiting for peers)."""
    ov = r.get("overlap")
    if ov is None:
        return "—", "—"
    if "hidden_share_min" not in ov:
        return "no device events", "—"
    share = ov["hidden_share_min"]
    return ("—" if share is None else f"{share:.0%}",
            f"{ov['comm_s_fastest_rank'] * 1e3:.1f} / {ov['comm_s_max'] * 1e3:.1f}")


def table(rows: list[dict]) -> str:
    """Markdown table of the rows (one line per case)."""
    head = ("| part | L | B | CP×DP | top-k mode | recompute | step s | tok/s/GPU | TFLOPS/GPU | peak GiB "
            "| sent MB/layer (arith.) | compute alone s | comm alone s | exposed s | hidden "
            "| timeline hidden (min rank) | comm ms/step (fastest / max rank) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['part']} | {r['L'] / K:g}K | {r['batch']} | {r['cp']}×{r['dp']} | {r['mode']} | "
                         f"{r.get('recompute', 'none')} | {r['error']} |" + " |" * 10)
            continue
        sent = r.get("sent_bytes_per_layer")
        arith = r.get("arith_bytes_per_layer")
        sent_s = "—" if sent is None else f"{sent / 1e6:.1f} ({arith / 1e6:.1f})"
        hidden = r.get("hidden_share")
        t_hidden, t_comm = _timeline(r)
        lines.append(
            f"| {r['part']} | {r['L'] / K:g}K | {r['batch']} | {r['cp']}×{r['dp']} | {r['mode']} | "
            f"{r.get('recompute', 'none')} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.0f} | {_fmt(r.get('peak_gib'), '.1f')} | "
            f"{sent_s} | {_fmt(r.get('compute_alone_s'), '.3f')} | {_fmt(r.get('comm_alone_s'), '.4f')} | "
            f"{_fmt(r.get('exposed_comm_s'), '.3f')} | {'—' if hidden is None else f'{hidden:.0%}'} | "
            f"{t_hidden} | {t_comm} |")
    return "\n".join(lines)


def kind_table(rows: list[dict]) -> str:
    """Markdown table of the timeline split by collective (rows measured with ``--overlap`` on a GPU): per kind,
    the least hidden share over the ranks and the comm-kernel ms per step of the fastest / slowest rank."""
    head = ("| part | L | CP | recompute | collective | kernels/step | hidden (min rank) "
            "| comm ms/step (fastest / max rank) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ranks = [p for p in (r.get("overlap") or {}).get("per_rank", []) if "by_kind" in p]
        for kind in sorted({k for p in ranks for k in p["by_kind"]}):
            per = [p["by_kind"].get(kind, {"comm_s": 0.0, "hidden_share": None, "kernels": 0}) for p in ranks]
            shares = [x["hidden_share"] for x in per if x["hidden_share"] is not None]
            comm = [x["comm_s"] * 1e3 for x in per]
            lines.append(f"| {r['part']} | {r['L'] / K:g}K | {r['cp']} | {r.get('recompute', 'none')} | {kind} | "
                         f"{max(x['kernels'] for x in per)} | {_fmt(min(shares) if shares else None, '.0%')} | "
                         f"{min(comm):.1f} / {max(comm):.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def write(rows: list[dict], args) -> None:
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpus": int(os.environ.get("WORLD_SIZE", "1")), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "args": {k: str(v) for k, v in vars(args).items()}}
    md = table(rows)
    kinds = kind_table(rows)
    if kinds:
        md += "\n\nTimeline by collective:\n\n" + kinds
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"cp_scaling{'_' + args.tag if args.tag else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "results": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(f"{json.dumps(meta)}\n\n{md}\n")
