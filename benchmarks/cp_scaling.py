"""Context-parallel scaling of DSA on one host: a V3.2 DSA layer and the `small` model's training step at
long lengths, CP = 1/2/4, NCCL (docs/context_parallel.md has the byte arithmetic; README the table).

Run (4 GPUs; every case uses all ranks: CP=c runs world/c data-parallel replicas of one sequence each)::

    python -m torch.distributed.run --nproc-per-node 4 benchmarks/cp_scaling.py --out DIR --budget-s 215 \
        --profile 32768:4          # as run for benchmarks/results/cp_scaling_h100x4.*
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/cp_scaling.py --smoke   # CPU/gloo dry run
    python -m torch.distributed.run --nproc-per-node 4 benchmarks/cp_scaling.py --out DIR --tag long \
        --recompute full --cases model:524288:4 layer:524288:4 model:131072:1   # exactly these, in this order
    python -m torch.distributed.run --nproc-per-node 4 benchmarks/cp_scaling.py --out DIR --tag overlap \
        --mode allgather --overlap --overlap-trace model:131072:4 --cases model:131072:4:none,layer:524288:4

Cases (``--parts``):
- ``layer``: the DSA steps of one DeepSeek-V3.2 attention layer (``dsa_dist.model.dsa_core.dsa_attention``:
  H=128, absorbed d_qk/d_v = 576/512, indexer H_I=64 × d_I=128, k=2048, FP8 indexer, KL of the indexer) —
  forward + backward from the absorbed queries, the KV latent and the indexer inputs (the q/kv/o projections are
  not included);
- ``attn_layer``: the whole V3.2 attention layer — the model's Megatron module with its q/kv projections, the
  same DSA steps and the output projection (hidden 7168), forward + backward from the layer input: what the CP
  exchanges can overlap inside a model layer (the projections' forward and backward);
- ``model``: the ``small`` preset (12 layers, MLA, vocab 512 as configs/single_gpu.yaml), sparse stage, one
  micro-batch of one sequence (``--batch B`` adds rows with B at the compare length): forward + backward (no
  optimizer step, no DP gradient reduction — the same for every layout);
- ``dense_layer`` / ``dense_model``: the same with dense causal attention over the KV all-gathered across CP
  (runtime ``dsa_dist.model.runtime.DENSE``: no indexer, no KL), where it fits the budget.

``--recompute full`` builds the model parts with Megatron's full activation recompute (``model.recompute``: one
layer per checkpoint; the KL is attached to the layer outputs); a ``--cases`` entry ``part:L:CP:full`` or
``part:L:CP:none`` sets it for that case alone. TFLOPS count model FLOPs (the recomputed forward is not counted);
the arithmetic bytes include the recomputed forward's collectives (KV and KL keys gathered again; the top-k is
kept from the first forward).

Per case: median step time over the ranks' slowest, tokens/s per GPU (L / (CP · t)), achieved TFLOPS per GPU
with the FLOP count written in the JSON (``flops``; formulas in :func:`layer_flops` / :func:`model_flops`),
peak memory per GPU, bytes each rank sends per layer counted at the collectives
(``dsa_dist.parallel._comm.count_comm_bytes``) next to ``dsa_dist.parallel.cp_layer_comm_volume``, the same
step with every collective replaced by a local copy (``local_only``: compute alone), the collectives of one step
replayed alone (communication alone), and exposed communication = step − compute alone; hidden share =
1 − exposed / communication alone. That difference of two timings is dominated by run-to-run noise and rank skew;
``--overlap`` measures instead, per rank, from a profiler timeline of the step (:mod:`benchmarks.comm_overlap`):
the NCCL kernel time, the part of it overlapped by compute kernels (hidden), the rest (exposed) — the row's
``overlap`` entry, with the least hidden share over the ranks and the comm time of the fastest rank.

A ``--cases`` entry ``part:L:CP:none|full:MODE`` runs that case with its own top-k mode (e.g.
``layer:524288:4:none:ring``). Hang diagnostics: ``--hang-dump-s N`` makes every rank write all its Python stacks
to stderr when a case runs longer than N s (and on SIGTERM); ``--pg-timeout-s`` is the NCCL watchdog's timeout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repo, unless dsa_dist is already importable

from benchmarks.comm_overlap import profile_overlap  # noqa: E402
from benchmarks.cp_scaling_plan import (  # noqa: E402
    PARTS,
    layer_flops,
    load_prior,
    model_flops,
    select_cases,
    shorter,
    skip_reason,
)
from benchmarks.cp_scaling_report import kind_table, table, write  # noqa: E402
from benchmarks.hang_dump import dump_stacks_on_sigterm, hang_dump  # noqa: E402
from dsa_dist.compat import default_device  # noqa: E402
from dsa_dist.model.config import DSAModelConfig, RecomputeConfig, preset  # noqa: E402
from dsa_dist.model.dsa_core import DSAInputs, dsa_attention  # noqa: E402
from dsa_dist.model.indexer import LightningIndexer  # noqa: E402
from dsa_dist.model.indexer_loss import IndexerLossTracker  # noqa: E402
from dsa_dist.model.runtime import DENSE, SPARSE_TRAIN, DSARuntime  # noqa: E402
from dsa_dist.parallel import ParallelDims, _comm, cp_layer_comm_volume, current_parallel_dims  # noqa: E402

K = 1024
GIB = 2**30


# ------------------------------------------------------------------------------------------------------- cases
def _preset(name: str, *, indexer: dict, **fields: object) -> DSAModelConfig:
    """``preset(name)`` with top-level ``fields`` and ``indexer`` fields replaced (the config is frozen)."""
    base = preset(name)
    return replace(base, **fields, indexer=replace(base.indexer, **indexer))


def _runtime(sparse: bool) -> DSARuntime:
    """Sparse training (top-k, sparse attention, sparse KL) or dense pre-training (no indexer, no KL)."""
    return SPARSE_TRAIN if sparse else DENSE


def _layer_cfg(smoke: bool, length: int, mode: str) -> DSAModelConfig:
    if smoke:
        return _preset("tiny", seq_len=length, indexer={"topk": 32, "cp_topk_mode": mode})
    return _preset("v32-layer", seq_len=length, indexer={"cp_topk_mode": mode})


def _model_cfg(smoke: bool, length: int, mode: str, recompute: str = "none") -> DSAModelConfig:
    name = "tiny" if smoke else "small"
    topk = 32 if smoke else 512
    return _preset(name, seq_len=length, vocab_size=512 if not smoke else 128,
                   indexer={"topk": topk, "cp_topk_mode": mode}, recompute=RecomputeConfig(granularity=recompute))


def make_layer_step(cfg: DSAModelConfig, dims: ParallelDims, length: int, sparse: bool, batch: int = 1):
    """A closure running one DSA attention forward + backward on this rank's shard (inputs built once)."""
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = cfg.to_transformer_config(None)
    q_in = cfg.mla.q_lora_rank
    indexer = LightningIndexer(config, cfg, q_in).to(device)
    local = length // dims.cp
    gen = torch.Generator(device=device).manual_seed(dims.cp_rank)
    q = torch.randn(batch, local, cfg.num_heads, cfg.core_qk_dim, device=device, dtype=dtype, generator=gen)
    kv = torch.randn(batch, local, 1, cfg.core_qk_dim, device=device, dtype=dtype, generator=gen)
    h = torch.randn(batch, local, cfg.hidden_size, device=device, dtype=dtype, generator=gen)
    cq = torch.randn(batch, local, q_in, device=device, dtype=dtype, generator=gen)
    q.requires_grad_(True)
    kv.requires_grad_(True)
    inputs = DSAInputs(q=q, k=kv, v=None, v_dim=cfg.core_v_dim, indexer_h=h, indexer_cq=cq,
                       positions=dims.local_positions(local, device))
    runtime = _runtime(sparse)
    tracker = IndexerLossTracker()

    def step() -> None:
        tracker.begin_forward()
        q.grad = kv.grad = None
        indexer.zero_grad(set_to_none=True)
        out = dsa_attention(inputs, indexer=indexer, dsa=cfg, runtime=runtime, dims=dims, tracker=tracker, layer=1)
        # The output is its own gradient (no second [L, H, d_v] tensor: memory is what limits the length).
        roots, grads = [out], [out.detach()]
        if sparse:
            roots.append(tracker.total())
            grads.append(None)
        torch.autograd.backward(roots, grads)

    return step, 1


def make_attn_step(cfg: DSAModelConfig, dims: ParallelDims, length: int, sparse: bool, batch: int = 1):
    """A closure running one whole DSA attention layer — the Megatron module of the model
    (:class:`dsa_dist.model.attention.DSAMLASelfAttention`: q/kv projections, the DSA steps, the output
    projection) — forward + backward from a layer input [L/CP, B, hidden] on this rank's shard."""
    from megatron.core.transformer.spec_utils import build_module

    from dsa_dist.model.specs import dsa_attention_spec

    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tracker = IndexerLossTracker()
    torch.manual_seed(0)
    attn = build_module(dsa_attention_spec(cfg, _runtime(sparse), tracker), config=cfg.to_transformer_config(None),
                        layer_number=1).to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(dims.cp_rank)
    x = torch.randn(length // dims.cp, batch, cfg.hidden_size, device=device, dtype=dtype, generator=gen)
    x.requires_grad_(True)

    def step() -> None:
        tracker.begin_forward()
        x.grad = None
        attn.zero_grad(set_to_none=True)
        out, _ = attn(x, None)
        roots, grads = [out], [out.detach()]  # the output is its own gradient, as in make_layer_step
        if sparse:
            roots.append(tracker.total())
            grads.append(None)
        torch.autograd.backward(roots, grads)

    step.n_linear = sum(p.numel() for p in attn.parameters())  # type: ignore[attr-defined]
    return step, 1


def make_model_step(cfg: DSAModelConfig, dims: ParallelDims, length: int, sparse: bool, batch: int = 1):
    """A closure running the model's forward + backward on one sequence (this rank's zigzag shard)."""
    from dsa_dist.model.builder import build_model, get_indexer_loss_tracker
    from dsa_dist.parallel import zigzag_split

    device = default_device()
    torch.manual_seed(0)
    model = build_model(cfg, runtime=_runtime(sparse))
    tracker = get_indexer_loss_tracker(model)
    tokens = torch.randint(0, cfg.vocab_size, (batch, length + 1), device=device)
    inputs = zigzag_split(tokens[:, :-1], 1, dims.cp, dims.cp_rank).contiguous()
    labels = zigzag_split(tokens[:, 1:], 1, dims.cp, dims.cp_rank).contiguous()

    def step() -> None:
        tracker.begin_forward()
        model.zero_grad(set_to_none=True)
        lm = model(inputs, None, None, labels=labels).float().mean()
        # Under full recompute the layers attach their KL to their outputs (weight model.indexer_loss_coeff).
        (lm + tracker.total() if sparse and tracker.attach_coeff is None else lm).backward()

    n_linear = sum(p.numel() for n, p in model.named_parameters() if "embedding" not in n and "output_layer" not in n)
    step.n_linear = n_linear  # type: ignore[attr-defined]
    return step, cfg.num_layers


# ------------------------------------------------------------------------------------------------------- timing
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs (synchronised; ranks aligned by a barrier first)."""
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=default_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _replay(calls) -> float:
    """Seconds to run the logged collectives alone, in order, on scratch buffers (communication alone)."""
    bufs = []
    device = default_device()
    for kind, group, nbytes in calls:
        n, rank = _comm.group_size_rank(group)
        if kind == "all_gather":
            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            bufs.append(("ag", group, src, torch.empty(n * nbytes, dtype=torch.uint8, device=device)))
        elif kind in ("reduce_scatter", "all_reduce"):
            src = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
            out = torch.empty(nbytes // 4 // n, dtype=torch.float32, device=device)
            bufs.append(("rs" if kind == "reduce_scatter" else "ar", group, src, out))
        elif kind == "all_to_all":
            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            bufs.append(("a2a", group, src, torch.empty_like(src)))
        else:
            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            bufs.append(("p2p", group, src, torch.empty_like(src)))

    def run() -> None:
        for kind, group, src, out in bufs:
            if kind == "ag":
                dist.all_gather_into_tensor(out, src, group=group)
            elif kind == "rs":
                dist.reduce_scatter_tensor(out, src, group=group)
            elif kind == "ar":
                dist.all_reduce(src, group=group)
            elif kind == "a2a":
                dist.all_to_all_single(out, src, group=group)
            else:
                for req in _comm.ring_shift(src, out, group):
                    req.wait()

    run()
    return _time(run, 3)


def measure(make, cfg: DSAModelConfig, dims: ParallelDims, length: int, sparse: bool, reps: int,
            batch: int = 1, overlap_steps: int = 0, trace_path: Path | None = None) -> dict:
    """Time one case; returns the row (also on OOM: ``{"error": "OOM"}``, agreed by all ranks).

    ``overlap_steps`` > 0: the communication's overlap comes from a profiler timeline of that many steps
    (``row["overlap"]``, :func:`benchmarks.comm_overlap.profile_overlap`; bytes counted in the same steps)
    instead of the compute-alone and replayed-collectives runs; < 0: neither (timing and memory only).
    """
    row: dict = {}
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step, layers = make(cfg, dims, length, sparse, batch)
        step()  # warm-up: Triton compile, NCCL communicators, allocator
        _sync()
        if torch.cuda.is_available():
            # The warm-up step's peak separately: the steady-state peak is what a training run holds.
            row["peak_first_step_gib"] = _max_over_ranks(torch.cuda.max_memory_allocated() / GIB)
            torch.cuda.reset_peak_memory_stats()
        first = _max_over_ranks(_time(step, 1))
        reps = reps if first < 1.0 else 1  # long steps: one more sample, fits the budget
        row["step_s"] = first if reps == 1 else _max_over_ranks(_time(step, reps))
        if torch.cuda.is_available():
            row["peak_gib"] = _max_over_ranks(torch.cuda.max_memory_allocated() / GIB)
        if overlap_steps > 0:
            with _comm.count_comm_bytes() as log:
                row["overlap"] = profile_overlap(step, overlap_steps, trace_path)
            if dims.cp > 1:
                row["sent_bytes_per_layer"] = log.total / layers / overlap_steps
                row["sent_by_kind_per_layer"] = {k: v / layers / overlap_steps for k, v in log.sent.items()}
        elif overlap_steps == 0 and hasattr(_comm, "count_comm_bytes") and dims.cp > 1:
            with _comm.count_comm_bytes() as log:
                step()
            row["sent_bytes_per_layer"] = log.total / layers
            row["sent_by_kind_per_layer"] = {k: v / layers for k, v in log.sent.items()}
            with _comm.local_only():
                step()
                row["compute_alone_s"] = _max_over_ranks(_time(step, reps))
            row["comm_alone_s"] = _max_over_ranks(_replay(log.calls))
            exposed = max(row["step_s"] - row["compute_alone_s"], 0.0)
            row["exposed_comm_s"] = exposed
            row["hidden_share"] = 1.0 - min(exposed / max(row["comm_alone_s"], 1e-9), 1.0)
        row["n_linear"] = getattr(step, "n_linear", None)
        del step
    except torch.OutOfMemoryError:
        row = {"error": "OOM"}
    failed = _max_over_ranks(1.0 if "error" in row else 0.0)
    if failed and "error" not in row:
        row = {"error": "OOM on another rank"}
    return row


# ------------------------------------------------------------------------------------------------------- driver
PG_TIMEOUT_S = 300.0  # collective timeout of every process group (--pg-timeout-s sets it before the groups exist)


def set_layout(cp: int) -> ParallelDims:
    """Megatron's parallel state for TP=1 × CP=``cp`` (× DP) over the already-initialised world.

    Built directly with ``create_gloo_process_groups=False``: the benchmark switches layouts many times, and
    re-creating Megatron's gloo groups on every switch failed once on a 4-GPU machine (a TCP mesh race).
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        if ps.get_context_parallel_world_size() == cp:
            return current_parallel_dims()
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, context_parallel_size=cp, create_gloo_process_groups=False,
                                 distributed_timeout_minutes=max(1, math.ceil(PG_TIMEOUT_S / 60)))
    return current_parallel_dims()


def _finish_row(row: dict, cfg, sparse: bool, is_model: bool) -> None:
    """Throughput, FLOPs and the arithmetic byte count next to the measured one."""
    length, cp, batch = row["L"], row["cp"], row["batch"]
    n_linear = row.pop("n_linear", None)
    if "step_s" not in row:
        return
    # attn_layer: the projections' GEMMs (6 · parameters · L) on top of the DSA core's FLOPs.
    flops = batch * (model_flops(cfg, length, n_linear, sparse) if is_model else layer_flops(cfg, length, sparse)
                     + 6.0 * (n_linear or 0) * length)
    row["flops"] = flops
    row["tokens_per_s_per_gpu"] = batch * length / cp / row["step_s"]
    row["tflops_per_gpu"] = flops / cp / row["step_s"] / 1e12
    if cp > 1:
        fwd_again = row.get("recompute") == "full"  # the recomputed forward repeats the forward exchanges
        vol = cp_layer_comm_volume(length, cp, d_index=cfg.indexer.head_dim, index_heads=cfg.indexer.heads,
                                   kv_dim=cfg.core_qk_dim, kv_dtype=cfg.torch_dtype, topk=cfg.indexer.topk,
                                   kl_key_dtype=cfg.torch_dtype if sparse else None)
        sparse_terms = vol.index_keys_fwd + vol.kl_keys_fwd + vol.dindex_keys_bwd if sparse else 0
        if sparse and row["mode"] == "candidates":
            sparse_terms += vol.candidates_mode_fwd - vol.index_keys_fwd
        # ... except the top-k exchange: the recomputed forward replays the kept top-k (model.recompute.keep_topk)
        fwd_terms = vol.kv_fwd + (vol.kl_keys_fwd if sparse else 0)
        row["arith_bytes_per_layer"] = batch * (vol.kv_fwd + vol.dkv_bwd + sparse_terms
                                                + (fwd_terms if fwd_again else 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["model", "layer", "dense_model", "dense_layer"],
                        choices=list(PARTS))
    parser.add_argument("--model-lengths", nargs="+", type=int, default=[128 * K, 256 * K, 512 * K, 1024 * K])
    parser.add_argument("--layer-lengths", nargs="+", type=int, default=[128 * K, 256 * K, 512 * K])
    parser.add_argument("--compare-length", type=int, default=32 * K, help="model length of the CP-vs-DP rows")
    parser.add_argument("--cps", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--mode", default="ring", choices=["ring", "allgather", "candidates"],
                        help="CP top-k exchange (dsa_dist.parallel.distributed_indexer_topk)")
    parser.add_argument("--extra-modes", nargs="*", default=["allgather"],
                        help="other top-k modes timed at the compare length and the largest CP")
    parser.add_argument("--batch", type=int, default=4,
                        help="also time this many sequences per micro-batch at the compare length (CP=1, max CP)")
    parser.add_argument("--only-compare", action="store_true", help="only the compare-length rows")
    parser.add_argument("--cases", nargs="+", default=None, metavar="PART:L:CP[:full|none]",
                        help="run exactly these cases in this order (comma- or space-separated), e.g. "
                             "model:524288:4,layer:524288:4,model:131072:1; --parts/--cps/lengths are ignored")
    parser.add_argument("--recompute", default="none", choices=["none", "full"],
                        help="full activation recompute of the model parts (model.recompute.granularity)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per case (median)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no case after this many seconds")
    parser.add_argument("--mem-gib", type=float, default=76.0, help="skip a case predicted to need more")
    parser.add_argument("--guess-tflops", type=float, default=150.0,
                        help="rate assumed to predict a case with no shorter run (budget check)")
    parser.add_argument("--guess-dense-tflops", type=float, default=15.0,
                        help="the same for dense attention (chunked reference path: ~12 TFLOPS in the dense stage)")
    parser.add_argument("--tag", default="", help="label stored in every row and the file names (before/after)")
    parser.add_argument("--out", type=Path, default=None, help="write cp_scaling_<tag>.json / .md here")
    parser.add_argument("--profile", default=None, metavar="L:CP",
                        help="first profile two model steps at this length and CP size (top ops, rank 0)")
    parser.add_argument("--overlap", action="store_true",
                        help="hidden communication from a profiler timeline (benchmarks/comm_overlap.py) of "
                             "--overlap-steps steps per case, instead of compute alone / replayed collectives")
    parser.add_argument("--overlap-steps", type=int, default=1, help="profiled steps per case with --overlap")
    parser.add_argument("--overlap-max-model-len", type=int, default=512 * K,
                        help="--overlap skips model cases longer than this: parsing the profiler's events of a "
                             "1M-token model step took minutes on the H100 host (the case is only timed)")
    parser.add_argument("--overlap-trace", nargs="*", default=[], metavar="PART:L:CP",
                        help="with --overlap and --out: write every rank's chrome trace of these cases "
                             "(traces/*.json.gz), e.g. model:131072:4")
    parser.add_argument("--prior", nargs="*", default=[], metavar="JSON",
                        help="results of earlier runs: predict memory and time of a case from their longest "
                             "shorter row when this run has none (e.g. the 1M model from the measured 512K)")
    parser.add_argument("--hang-dump-s", type=float, default=240.0,
                        help="per case, every rank writes all its Python stacks to stderr if the case still runs "
                             "after this many seconds (0: off); stacks are also dumped on SIGTERM")
    parser.add_argument("--pg-timeout-s", type=float, default=300.0,
                        help="collective timeout of the process groups (NCCL watchdog)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any backend (CPU gloo dry run)")
    args = parser.parse_args()
    if args.overlap_steps < 1:
        parser.error(f"--overlap-steps must be >= 1, got {args.overlap_steps}")
    if args.smoke:
        args.model_lengths, args.layer_lengths, args.compare_length, args.reps = [512], [256], 256, 1
    start = time.monotonic()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dump_stacks_on_sigterm()
    global PG_TIMEOUT_S
    PG_TIMEOUT_S = args.pg_timeout_s
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=timedelta(seconds=args.pg_timeout_s))
    rank = dist.get_rank()
    if args.profile:
        profile(args, rank)
    prior = load_prior(args.prior)
    rows: list[dict] = []
    seen: dict[tuple, dict] = {}  # ((part, cp, mode, batch), L) -> row that ran: predicts time and memory
    for case in select_cases(args, world):
        part, length, cp = case["part"], case["L"], case["cp"]
        if length % (2 * cp):
            continue
        sparse, is_model = not part.startswith("dense"), part.endswith("model")
        cfg = (_model_cfg(args.smoke, length, case["mode"], case["recompute"]) if is_model
               else _layer_cfg(args.smoke, length, case["mode"]))
        row = {**case, "dp": world // cp, "tag": args.tag}
        key = (part, cp, case["mode"], case["batch"], case["recompute"])
        reason = skip_reason(case, cfg, shorter(seen, key, length, prior), time.monotonic() - start, args)
        if reason:
            row["error"] = reason
        else:
            label = f"{part}:{length}:{cp}:{case['recompute']}:{case['mode']}"
            traced = args.overlap and args.out is not None and f"{part}:{length}:{cp}" in args.overlap_trace
            trace = (args.out / "traces" / f"{args.tag or 'run'}_{label.replace(':', '_')}_rank{rank}.json.gz"
                     if traced else None)
            with hang_dump(args.hang_dump_s, f"rank {rank} case {label}"):
                dims = set_layout(cp)
                make = make_model_step if is_model else make_attn_step if part == "attn_layer" else make_layer_step
                profiled = args.overlap and not (is_model and length > args.overlap_max_model_len)
                row.update(measure(make, cfg, dims, length, sparse, args.reps, case["batch"],
                                   args.overlap_steps if profiled else (-1 if args.overlap else 0),
                                   trace if profiled else None))
            seen[(key, length)] = row
        _finish_row(row, cfg, sparse, is_model)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
            write(rows, args)  # after every case: a run cut short keeps what it measured
    if rank == 0:
        print(table(rows), flush=True)
        kinds = kind_table(rows)
        if kinds:
            print(kinds, flush=True)
    dist.barrier()
    dist.destroy_process_group()


def profile(args, rank: int) -> None:
    """torch.profiler over two model steps at ``--profile L:CP``: the top ops by self device time (rank 0)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    length, cp = (int(x) for x in args.profile.split(":"))
    dims = set_layout(cp)
    step, _ = make_model_step(_model_cfg(args.smoke, length, args.mode), dims, length, True)
    step()
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(2):
            step()
        _sync()
    del step
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if rank == 0:
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        events = prof.key_averages()
        text = events.table(sort_by=key, row_limit=45, max_name_column_width=70)
        # (no device total: kernels count under their op and again as kernel rows)
        cpu_us = sum(e.self_cpu_time_total for e in events)
        text += f"\nprofile {args.tag} L={length} CP={cp}, 2 steps: self CPU total {cpu_us / 1e3:.1f} ms\n"
        print(text, flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"profile_{args.tag or 'run'}_{length // K}k_cp{cp}.txt").write_text(text)


if __name__ == "__main__":
    main()
