"""Training-step throughput of the small model per stage, against plain SDPA attention with no indexer.

    python benchmarks/train_stages.py --out DIR [--batch 4] [--length 4096] [--reps 5]
    python benchmarks/train_stages.py --smoke [--out DIR]     # CPU, tiny model: the whole script in seconds

The ``small`` preset as configs/single_gpu.yaml trains it (bf16, 4096 tokens, micro-batch 4, vocab 512, top-k
512), one GPU, weights in bf16 through Megatron's ``Float16Module`` as the trainer runs them. A timed step is
forward + backward of one micro-batch as the trainer's stage does it (:data:`dsa_dist.train.stages.STAGES`: the
stage's trainable parameters, LM loss where it has one, ``indexer_loss_coeff`` × the indexer KL where it trains
the indexer — the warm-up trains only the indexer, so its backward is the KL's), no optimizer. Rows:

- ``dense``: dense pre-training runtime (the indexer does not run), attention =
  :func:`dsa_dist.ops.dispatch.dense_attention` (fused flash / memory-efficient kernel with its lse on CUDA);
- ``warmup``: dense attention + the dense indexer KL (the stage that needs the attention's lse);
- ``sparse``: indexer top-k + sparse attention + sparse KL (Triton kernels);
- ``sdpa_baseline``: the dense runtime with its attention replaced by ``torch.nn.functional.
  scaled_dot_product_attention(is_causal=True)`` (PyTorch picks flash / cuDNN / memory-efficient; K/V heads
  expanded as it needs; no lse) — the "same model, plain attention, no indexer" reference.

Per row: median step time over ``--reps`` (CUDA events), tokens/s = batch × length / time, peak memory
(``max_memory_allocated`` during the timed steps, model and grads included) and tokens/s relative to the
baseline; ``lm_loss`` of the first step (same seed and batch: the dense and baseline rows compute the same model,
so their losses agree to bf16 rounding). Writes ``train_stages.json`` / ``train_stages.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import GIB, markdown_table, write_results  # noqa: E402

ROWS = ("sdpa_baseline", "dense", "warmup", "sparse")


def _init_single_rank() -> None:
    """One process, TP = CP = 1 (init_parallel picks a free rendezvous port when MASTER_PORT is unset)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from dsa_dist.parallel import init_parallel

    init_parallel(1, 1)


def _config(smoke: bool, length: int):
    from dsa_dist.model import preset

    if smoke:
        return dataclasses.replace(preset("tiny"), seq_len=length)
    base = preset("small")  # configs/single_gpu.yaml: vocab 512 (bytes), seq_len 4096, top-k 512
    return dataclasses.replace(base, vocab_size=512, seq_len=length,
                               indexer=dataclasses.replace(base.indexer, topk=512))


def _sdpa_attend(q, k_full, v_full, *, softmax_scale, positions, topk=None, indices_checked=False,
                 position_blocks=None):
    """Plain causal SDPA (CP = 1: positions are arange, top-left causal is right); no lse (the dense runtime
    without the KL never reads it)."""
    h = q.shape[2]
    k, v = (x.repeat_interleave(h // x.shape[2], dim=2) for x in (k_full, v_full))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=softmax_scale)
    return out.transpose(1, 2), None


@contextlib.contextmanager
def _plain_sdpa():
    """Swap the DSA layers' attention step for :func:`_sdpa_attend` (the baseline row only)."""
    from dsa_dist.model import dsa_core

    saved = dsa_core.attend
    dsa_core.attend = _sdpa_attend
    try:
        yield
    finally:
        dsa_core.attend = saved


def measure(row: str, cfg, batch: int, reps: int, device: torch.device) -> dict:
    """Median forward + backward step of the model in the runtime of ``row`` (see the module docstring)."""
    from dsa_dist.model import DSARuntime, build_model, get_indexer_loss_tracker
    from dsa_dist.train.stages import STAGES, set_trainable

    spec = STAGES["dense" if row == "sdpa_baseline" else row]
    torch.manual_seed(0)
    model = build_model(cfg, runtime=DSARuntime(attention=spec.attention, indexer_kl=spec.indexer_loss))
    tracker = get_indexer_loss_tracker(model)
    set_trainable(model, spec)
    if model.config.bf16:  # as the trainer: every parameter in bf16, fp32 logits out
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def step() -> torch.Tensor:
        tracker.begin_forward()
        lm = model(inputs, None, None, labels=labels).float().mean()
        loss = lm if spec.lm_loss else 0.0
        if spec.indexer_loss:
            loss = loss + cfg.indexer_loss_coeff * tracker.total()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return lm.detach()

    with _plain_sdpa() if row == "sdpa_baseline" else contextlib.nullcontext():
        t0 = time.perf_counter()
        lm_loss = step().item()  # warm-up: Triton compilation, allocator, lazy imports
        step()
        sync()
        first_s = time.perf_counter() - t0
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            sync()
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            step()
            if on_gpu:
                end.record()
            sync()
            times.append(start.elapsed_time(end) if on_gpu else (time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    return {"row": row, "batch": batch, "length": cfg.seq_len, "ms": ms, "tok_s": batch * cfg.seq_len / ms * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB if on_gpu else None,
            "warmup_s": round(first_s, 2), "lm_loss": lm_loss}


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["row"] == "sdpa_baseline" and "ms" in r), None)
    body = []
    for r in rows:
        if "ms" not in r:
            body.append([r["row"], r["batch"], r["length"], "failed", "", "", r["error"]])
            continue
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}" if base else "n/a"
        body.append([r["row"], r["batch"], r["length"], f"{r['tok_s']:,.0f}", r["ms"],
                     "n/a (CPU)" if r["peak_gib"] is None else r["peak_gib"], ratio])
    return markdown_table(["stage", "batch", "L", "tok/s", "ms / step", "peak GiB", "tok/s vs baseline"], body)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write train_stages.json / train_stages.md here")
    ap.add_argument("--batch", type=int, default=4, help="micro-batch (configs/single_gpu.yaml: 4); --smoke: 1")
    ap.add_argument("--length", type=int, default=4096, help="tokens per sequence; --smoke: 64")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per row (median reported)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--smoke", action="store_true", help="CPU run of the tiny preset (reference ops)")
    args = ap.parse_args(argv)
    rows_wanted = args.rows.split(",")
    unknown = sorted(set(rows_wanted) - set(ROWS))
    if unknown:
        ap.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    if args.smoke:
        device, batch, length, reps = torch.device("cpu"), 1, 64 if args.length == 4096 else args.length, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("train_stages.py: needs a CUDA GPU (or --smoke for the CPU run); nothing was measured.")
        device, batch, length, reps = torch.device("cuda"), args.batch, args.length, args.reps
    _init_single_rank()
    from dsa_dist.parallel import destroy_parallel

    cfg = _config(args.smoke, length)
    rows = []
    try:
        for name in rows_wanted:
            try:
                rows.append(measure(name, cfg, batch, reps, device))
            except torch.OutOfMemoryError as err:  # report the row and go on with the next one
                traceback.print_exc()
                rows.append({"row": name, "batch": batch, "length": length, "error": f"OOM: {str(err)[:80]}"})
            print(rows[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        destroy_parallel()
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "preset": "tiny" if args.smoke else "small"}
    write_results(args.out, "train_stages", meta, rows, table(rows))


if __name__ == "__main__":
    main()
