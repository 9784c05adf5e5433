"""The end-of-job summary: one row per stage (losses or GRPO reward, indexer KL and recall, evals, tokens/s,
restarts)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsa_dist.config import TrainRunConfig


def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def stage_row(stage: str, report: dict) -> list[str]:
    """Table cells of one stage from rank 0's merged per-step records."""
    records = report.get("records", [])
    lm = [r["lm_loss"] for r in records if r.get("lm_loss") is not None]
    reward = [r["reward/mean"] for r in records if r.get("reward/mean") is not None]  # the grpo stage
    tok_key = "perf/train_tokens_per_s" if reward else "tokens_per_s"
    tok_s = [r[tok_key] for r in records if r.get(tok_key) is not None]
    evals = {k[len("eval/"):-len("_acc")]: v for r in records for k, v in r.items()
             if k.startswith("eval/") and k.endswith("_acc")}
    steps = max((r["step"] for r in records), default=0)
    first_last = (f"{_fmt(lm[0])} -> {_fmt(lm[-1])}" if lm else
                  f"reward {_fmt(reward[0], '.3f')} -> {_fmt(reward[-1], '.3f')}" if reward else "-")
    return [stage, str(steps), first_last,
            _fmt(_last(records, "indexer_kl")), _fmt(_last(records, "indexer_recall"), ".3f"),
            " ".join(f"{k} {v:.2f}" for k, v in evals.items()) or "-",
            f"{sum(tok_s) / len(tok_s):,.0f}" if tok_s else "-", str(report.get("restarts", 0))]


def summary_table(cfg: TrainRunConfig, reports: dict[str, dict]) -> str:
    """The summary of a finished job as text (a rich table plus where the run dir is)."""
    table = Table(title="dsa_dist job summary", title_justify="left")
    for col in ("stage", "steps", "lm loss / reward (first -> last)", "indexer KL", "recall", "eval acc", "tokens/s",
                "restarts"):
        table.add_column(col)
    for stage in cfg.pipeline:
        table.add_row(*stage_row(stage, reports.get(stage, {})))
    out = io.StringIO()
    console = Console(file=out, width=150, force_terminal=False, color_system=None)
    console.print(table)
    run_dir = Path(cfg.run_dir).resolve()
    console.print(f"run dir: {run_dir}  (checkpoints and metrics.jsonl per stage; "
                  f"tensorboard --logdir {run_dir})", soft_wrap=True)
    return out.getvalue()
