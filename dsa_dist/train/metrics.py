"""Training metrics: TensorBoard scalars, a JSONL log, a progress bar and a one-line summary (docs/training.md).

Rank 0 writes everything; other ranks get a :class:`MetricsLogger` that does nothing. Scalars of a stage go to
``<run_dir>/<stage>/tensorboard`` (one SummaryWriter per stage, so TensorBoard shows the stages as runs) and to
``<run_dir>/<stage>/metrics.jsonl`` (one JSON object per log step, for scripts and tests).

Scalar tags (see docs/training.md): ``loss/lm``, ``loss/indexer_kl``, ``loss/total``, ``indexer/recall``,
``optim/lr``, ``optim/indexer_lr``, ``optim/grad_norm``, ``perf/tokens_per_s``, ``perf/tflops``,
``perf/peak_memory_gb``, ``train/skipped_steps`` (steps skipped as non-finite), ``eval/<task>_acc``,
``eval/<task>_answer_loss``.

Achieved TFLOPS use the usual estimate: a matmul weight with N elements costs 2·N FLOPs per token forward and
4·N backward; attention costs 2·H·(d_qk + d_v) per (query, key) pair forward (keys = causal average L/2 for
dense attention, k for sparse) and twice that backward; the indexer scores 2·H_I·d_I per causal pair. Only the
parts that are trained get the backward term (warm-up: the indexer only).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

TAGS = {
    "lm_loss": "loss/lm",
    "indexer_kl": "loss/indexer_kl",
    "loss": "loss/total",
    "indexer_recall": "indexer/recall",
    "lr": "optim/lr",
    "indexer_lr": "optim/indexer_lr",
    "grad_norm": "optim/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "tflops": "perf/tflops",
    "peak_memory_gb": "perf/peak_memory_gb",
    "skipped_steps": "train/skipped_steps",
}


def peak_memory_gb() -> float:
    """Peak CUDA memory allocated by this process (GB), or the peak resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def flops_per_sequence(model_cfg, n_matmul_params: int, n_indexer_params: int, *, seq_len: int, sparse: bool,
                       train_main: bool, train_indexer: bool) -> float:
    """Estimated FLOPs of one forward+backward over one sequence of ``seq_len`` tokens (module docstring)."""
    m = model_cfg
    pairs_dense = seq_len * (seq_len + 1) / 2  # causal (query, key) pairs
    pairs_attn = seq_len * min(m.indexer.topk, seq_len) if sparse else pairs_dense
    attn = 2 * m.num_heads * (m.core_qk_dim + m.core_v_dim) * pairs_attn * m.num_layers
    scores = 2 * m.indexer.heads * m.indexer.head_dim * pairs_dense * m.num_layers
    main = 2 * (n_matmul_params - n_indexer_params) * seq_len + attn
    indexer = 2 * n_indexer_params * seq_len + scores
    return main * (3 if train_main else 1) + indexer * (3 if train_indexer else 1)


class MetricsLogger:
    """Rank-0 sink for scalars, progress and console lines of one stage (a no-op on other ranks)."""

    def __init__(self, stage_dir: Path, stage: str, total_steps: int, start_step: int, *, enabled: bool,
                 tensorboard: bool, progress: str) -> None:
        self.stage, self.enabled = stage, enabled
        self._writer = self._bar = None
        self._t0 = time.perf_counter()
        if not enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(stage_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(stage_dir / "tensorboard"))
        if progress == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(stage, total=total_steps, completed=start_step)
            self._bar.start()
        elif progress == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None and hasattr(self._bar, "console"):
            self._bar.console.print(line, highlight=False, markup=False, soft_wrap=True)  # no hard wraps in logs
        elif self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step``."""
        if self._bar is None:
            return
        if hasattr(self._bar, "update") and hasattr(self._bar, "console"):
            self._bar.update(self._task, completed=step)
        else:
            self._bar.update(step - self._bar.n)

    def log(self, step: int, scalars: dict[str, float], prefix: str = "", *, quiet: bool = False) -> None:
        """Write ``scalars`` at ``step`` to TensorBoard and metrics.jsonl; print the one-line summary (unless
        ``quiet``)."""
        if not self.enabled:
            return
        for name, value in scalars.items():
            if self._writer is not None and value is not None:
                self._writer.add_scalar(TAGS.get(name, name), value, step)
        self._jsonl.write(json.dumps({"step": step, "stage": self.stage, **scalars}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()
        if not quiet:
            self.print(prefix + summary_line(self.stage, step, scalars))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop() if hasattr(self._bar, "console") else self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._jsonl.close()


def summary_line(stage: str, step: int, s: dict[str, float]) -> str:
    """``[sparse] step 40 | lm 2.913 | kl 0.412 | recall 0.87 | lr 1.0e-03 | gnorm 0.53 | 12.3k tok/s | ...``."""
    parts = [f"[{stage}] step {step}"]
    fmt = [("lm_loss", "lm {:.4f}"), ("indexer_kl", "kl {:.4f}"), ("indexer_recall", "recall {:.3f}"),
           ("lr", "lr {:.2e}"), ("indexer_lr", "ilr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
           ("tokens_per_s", "{:.0f} tok/s"), ("tflops", "{:.3f} TFLOPS"), ("peak_memory_gb", "mem {:.2f} GB")]
    for key, f in fmt:
        if s.get(key) is not None:
            parts.append(f.format(s[key]))
    parts += [f"{k} {v:.3f}" for k, v in s.items() if k.startswith(("eval/", "reward/"))]
    return " | ".join(parts)
