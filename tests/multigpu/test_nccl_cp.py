"""Context parallelism on NCCL, one GPU per rank, at 32K tokens: CP = 2 and 4 (and TP=2 × CP=2) against CP=1.

The gloo tests (tests/parallel/test_cp_multirank.py, tests/model/test_parallel_equivalence.py) check the same
equivalences at tiny sizes in float32/float64 with the reference ops; these run the production path — NCCL
collectives, the Triton kernels behind ``dsa_dist.ops.dispatch``, bf16 — at a length where every shard holds
thousands of tokens. They are skipped unless at least 2 CUDA devices are visible (CP=4 and TP×CP need 4).

1. ``distributed_indexer_topk`` (V3.2 indexer shapes: H_I=64, d_I=128, k=2048) in all three modes, on the world
   and on the CP sub-groups {0,1}, {2,3}: indices **and** scores bit-identical to the single-GPU top-k of the full
   sequence (integer-valued FP8 inputs, so every score is exact and ties are frequent; and random FP8 inputs).
2. One DSA attention layer and a 2-layer model (the ``small`` preset's shapes, sparse stage, bf16): every
   CP/TP layout and top-k mode against the TP=1/CP=1 run on the same GPU from the same weights and inputs —
   outputs, input gradients and every parameter gradient within bf16 tolerance (relative Frobenius error), the
   LM loss and the indexer KL, and the top-k indices of every query row.

Run on a machine with 4 GPUs: ``python -m pytest -q tests/multigpu`` (each test spawns its own ranks).
CPU dry run of the same workers over gloo (reference ops instead of Triton; tiny length, so the bf16 gradient
tolerances, set for 32K tokens, are not the point there)::

    DSA_TEST_CP_SEQ=256 DSA_TEST_CP_WORLD=2 PYTHONPATH=. python -c "import tests.multigpu.test_nccl_cp as t; \
        t.test_distributed_topk_bit_identical_on_nccl(); t.test_layer_and_model_match_cp1_on_nccl()"
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_distributed

# DSA_TEST_CP_SEQ shrinks the length for a CPU dry run of the workers over gloo (see run_distributed's backend).
SEQ, SEED = int(os.environ.get("DSA_TEST_CP_SEQ", "32768")), 1234
BACKEND = "nccl" if torch.cuda.is_available() else "gloo"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA devices (NCCL context parallel)"),
]


def _world() -> int:
    """4 ranks where 4 GPUs are visible (CP=2, CP=4, TP2×CP2), else 2 (CP=2 only); DSA_TEST_CP_WORLD overrides
    it for the CPU dry run."""
    return int(os.environ.get("DSA_TEST_CP_WORLD", 4 if torch.cuda.device_count() >= 4 else 2))


# ------------------------------------------------------------------------------------------------ top-k, op level
def _topk_inputs(kind: str, length: int, device: torch.device):
    from dsa_dist.ops import fp8_block_quant

    gen = torch.Generator().manual_seed(SEED)
    h, d = 64, 128
    if kind == "integer":  # exact integer scores: ties everywhere, so a tie-break slip changes the indices
        q = torch.randint(-2, 3, (1, length, h, d), generator=gen).float().to(torch.float8_e4m3fn)
        k = torch.randint(-2, 3, (1, length, d), generator=gen).float().to(torch.float8_e4m3fn)
        w = torch.randint(-1, 3, (1, length, h), generator=gen).float()
        s = (2.0 ** torch.randint(0, 2, (1, length), generator=gen)).float()
        return q.to(device), w.to(device), k.to(device), s.to(device)
    q, qs = fp8_block_quant(torch.randn(1, length, h, d, generator=gen).to(device), d)
    k, ks = fp8_block_quant(torch.randn(1, length, d, generator=gen).to(device), d)
    w = torch.randn(1, length, h, generator=gen).to(device) * qs.squeeze(-1)
    return q, w, k, ks.squeeze(-1)


def _topk_worker(rank: int, world: int) -> dict:
    from dsa_dist.compat import default_device
    from dsa_dist.ops import dispatch
    from dsa_dist.parallel import TOPK_MODES, distributed_indexer_topk, zigzag_split

    device = default_device()
    topk = min(2048, SEQ // 4)  # V3.2 k; smaller only in the CPU dry run
    layouts = {f"cp{world}": (dist.group.WORLD, world, rank)}
    if world == 4:  # CP=2 on sub-groups whose group ranks differ from the global ones
        subgroups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        layouts["cp2"] = (subgroups[rank // 2], 2, rank % 2)
    mismatches = {}
    for kind in ("integer", "random"):
        q, w, k, s = _topk_inputs(kind, SEQ, device)
        ref_s, ref_i = dispatch.lightning_indexer_topk(q, k, w, topk, s)
        assert (ref_i == -1).any() and (ref_i[:, -1] >= 0).all(), "rows with and without -1 padding"
        for name, (group, cp, cp_rank) in layouts.items():
            shard = lambda x, c=cp, r=cp_rank: zigzag_split(x, 1, c, r)  # noqa: E731
            for mode in TOPK_MODES:
                got_s, got_i = distributed_indexer_topk(shard(q), shard(w), shard(k), shard(s), topk, group=group,
                                                        mode=mode)
                bad_scores = got_s.view(torch.int32) != shard(ref_s).view(torch.int32)  # bitwise
                mismatches[(kind, name, mode)] = (int((got_i != shard(ref_i)).sum()), int(bad_scores.sum()))
    return mismatches


def test_distributed_topk_bit_identical_on_nccl():
    world = _world()
    results = run_distributed(_topk_worker, world, backend=BACKEND, timeout=600)
    for rank, mismatches in enumerate(results):
        for key, (bad_idx, bad_scores) in mismatches.items():
            assert bad_idx == 0 and bad_scores == 0, f"rank {rank} {key}: {bad_idx} indices, {bad_scores} scores differ"


# --------------------------------------------------------------------------------- one layer and a 2-layer model
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _cfg(topk_mode: str):
    from tests.model._configs import model_config

    return model_config("small", num_layers=2, seq_len=SEQ, vocab_size=512,
                        indexer={"topk": min(512, SEQ // 8), "cp_topk_mode": topk_mode})


def _layer_run(dims, topk_mode: str) -> dict:
    from megatron.core.transformer.spec_utils import build_module

    from dsa_dist.compat import default_device
    from dsa_dist.model.indexer_loss import IndexerLossTracker
    from dsa_dist.model.runtime import SPARSE_TRAIN
    from dsa_dist.model.specs import dsa_attention_spec
    from tests.model.test_parallel_equivalence import _full_grads, _split

    cfg = _cfg(topk_mode)
    tracker = IndexerLossTracker()
    torch.manual_seed(SEED)
    attn = build_module(dsa_attention_spec(cfg, SPARSE_TRAIN, tracker), config=cfg.to_transformer_config(None),
                        layer_number=1)
    attn = attn.to(default_device())
    gen = torch.Generator().manual_seed(SEED + 1)
    x_full = torch.randn(SEQ, 1, cfg.hidden_size, generator=gen).to(default_device(), torch.bfloat16)
    g_full = torch.randn(SEQ, 1, cfg.hidden_size, generator=gen).to(default_device(), torch.bfloat16)
    x = _split(x_full, 0, dims).detach().requires_grad_(True)
    tracker.begin_forward(record_topk=True)
    out, _ = attn(x, None)
    loss = (out.float() * _split(g_full, 0, dims).float()).sum() / x.shape[0] + tracker.total()
    loss.backward()
    x_grad = x.grad.float() / dims.cp  # each CP rank's loss is a mean over its rows
    positions = dims.local_positions(x.shape[0], x.device)
    return {"positions": positions, "out": out.detach(), "x_grad": x_grad,
            "kl": tracker.values(reduce=True)[1], "topk": {ly: (positions, i) for ly, i in tracker.topk().items()},
            "grads": _full_grads(attn, dims)}


def _model_run(dims, topk_mode: str) -> dict:
    from dsa_dist.compat import default_device
    from dsa_dist.model.builder import build_model, get_indexer_loss_tracker
    from dsa_dist.model.runtime import SPARSE_TRAIN
    from tests.model.test_parallel_equivalence import _full_grads, _split

    cfg = _cfg(topk_mode)
    torch.manual_seed(SEED)
    model = build_model(cfg, runtime=SPARSE_TRAIN)
    tracker = get_indexer_loss_tracker(model)
    gen = torch.Generator().manual_seed(SEED + 2)
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ + 1), generator=gen).to(default_device())
    inputs, labels = _split(tokens[:, :-1], 1, dims), _split(tokens[:, 1:], 1, dims)
    tracker.begin_forward(record_topk=True)
    per_token = model(inputs.contiguous(), None, None, labels=labels.contiguous())  # [b, s_local]
    lm = per_token.float().mean()
    (lm + tracker.total()).backward()
    lm_value = lm.detach().clone()
    if dims.cp > 1:
        dist.all_reduce(lm_value, group=dims.cp_group)
        lm_value /= dims.cp
    positions = dims.local_positions(inputs.shape[1], inputs.device)
    return {"positions": positions, "per_token": per_token.detach(),
            "lm": lm_value.item(), "kl": tracker.values(reduce=True),
            "topk": {ly: (positions, i) for ly, i in tracker.topk().items()}, "grads": _full_grads(model, dims)}


def _topk_agreement(ref_topk: dict, got_topk: dict) -> dict[int, tuple[float, float]]:
    """Per layer, over this rank's query rows: (share of (row, slot) entries equal to the CP=1 run's, share of
    the CP=1 run's top-k *set* that was selected). Slot equality is what identical inputs give; the set share is
    the meaningful one when upstream rounding differs (one key entering near the top shifts every later slot)."""
    out = {}
    for layer, (pos, idx) in got_topk.items():
        ref = ref_topk[layer][1][:, pos.long().cpu()].long().cpu()  # compared on the host: ranks keep them on GPU
        got = idx.long().cpu()
        k = ref.shape[-1]
        slots = torch.arange(k)
        # −1 (empty) slots must not match each other: give each a distinct negative id per side
        both = torch.cat([torch.where(ref >= 0, ref, -1 - slots), torch.where(got >= 0, got, -1 - k - slots)], -1)
        ordered = both.sort(-1).values
        common = (ordered[..., 1:] == ordered[..., :-1]).sum(-1).float()  # each shared key sits twice in a row
        valid = (ref >= 0).sum(-1).clamp_min(1).float()
        out[layer] = (float((ref == got).float().mean()), float((common / valid).clamp(max=1.0).mean()))
    return out


def _compare(ref: dict, got: dict, seq_dim: int, field: str) -> dict:
    pos = got["positions"]
    report = {field: _rel(got[field], ref[field].index_select(seq_dim, pos))}
    names = sorted(got["grads"])
    report["grads"] = _rel(torch.cat([got["grads"][n].float().flatten() for n in names]),
                           torch.cat([ref["grads"][n].float().flatten() for n in names]))
    report["grad_max"] = max(_rel(g, ref["grads"][n]) for n, g in got["grads"].items())
    report["worst_grad"] = max(got["grads"], key=lambda n: _rel(got["grads"][n], ref["grads"][n]))
    report["topk_agree"] = _topk_agreement(ref["topk"], got["topk"])
    return report


def _equivalence_worker(rank: int, world: int) -> dict:
    from dsa_dist.parallel import init_parallel

    layouts = [(1, 2, m) for m in ("ring", "allgather", "candidates")]
    if world == 4:
        layouts += [(1, 4, m) for m in ("ring", "allgather", "candidates")] + [(2, 2, "ring"), (2, 2, "candidates")]
    ref_dims = init_parallel(1, 1)
    ref_layer, ref_model = _layer_run(ref_dims, "ring"), _model_run(ref_dims, "ring")
    reports = {}
    for tp, cp, mode in layouts:
        dims = init_parallel(tp, cp)
        layer, model = _layer_run(dims, mode), _model_run(dims, mode)
        rep_layer = _compare(ref_layer, layer, 0, "out")
        rep_layer["x_grad"] = _rel(layer["x_grad"], ref_layer["x_grad"].index_select(0, layer["positions"]))
        rep_layer["kl"] = abs(layer["kl"] - ref_layer["kl"]) / abs(ref_layer["kl"])
        rep_model = _compare(ref_model, model, 1, "per_token")
        rep_model["lm"] = abs(model["lm"] - ref_model["lm"]) / abs(ref_model["lm"])
        rep_model["kl"] = max(abs(model["kl"][ly] - v) / abs(v) for ly, v in ref_model["kl"].items())
        reports[(tp, cp, mode)] = {"layer": rep_layer, "model": rep_model}
        del layer, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return reports


# bf16 tolerances (relative Frobenius error against the CP=1 run on the same GPU). With TP=1 the CP layouts
# differ only in fp32 summation order (reduce-scatter vs in-kernel sums): on 4×H100 (2026-11-26) outputs and
# top-k were bit-identical and the worst parameter gradient was 0.9% off. TP=2 splits the GEMMs and all-reduces
# partial bf16 outputs, so the hidden states of layer 2 differ by rounding (per-token loss 1.5e-3): there the
# worst single parameter gradient measured 13.9% (layer 2's linear_q_up; all gradients together 1.8%).
# "grads" is all gradients as one vector; "grad_max" the worst single parameter (a bf16 .grad of a norm weight is
# a sum over a rank's tokens, rounded before the average).
TOL = {"out": 1e-2, "x_grad": 2e-2, "per_token": 1e-2, "grads": 3e-2, "kl": 1e-2, "lm": 1e-3}
GRAD_MAX_TOL = {1: 0.05, 2: 0.2}  # by TP size

# Top-k indices. Where the indexer's inputs are bit-identical to the CP=1 run, the indices must be identical slot
# by slot: the CP top-k is bit-identical to the single-GPU top-k (test_distributed_topk_bit_identical_on_nccl),
# and TP only splits the indexer's query rows (each row's scores are computed the same way). That covers the
# single layer (its input x is the same tensor on every layout), layer 1 of the model under any TP (its input is
# the vocabulary-parallel embedding: one rank's row summed with zeros, exact) and every layer under TP=1 (CP
# splits only the sequence; every GEMM still runs on whole rows, and the outputs measured bit-identical on
# 4×H100). That last part is a property of the GPU's kernels, not of the math: a GEMM library may pick another
# kernel (another summation order) for another row count. CPU bf16 GEMMs do at 1024 tokens — the gloo dry run
# below then sees per-token losses 5e-4 apart and a few top-k slots differ even at TP=1 — so the dry run only
# exercises the code paths at 256 tokens; this check is meant for the GPU path.
#
# Under TP>1 the indexer inputs of layer 2 are *not* identical: layer 1's linear_proj and MLP fc2 are
# row-parallel, so each TP rank multiplies half of the inner dimension, rounds its partial output to bf16 and
# the halves are summed by the all-reduce, where TP=1 accumulates one GEMM in fp32 and rounds once. Layer 2's
# input (the indexer's h, and through linear_q_down its c_q) then differs from the TP=1 run by bf16 rounding
# (~2^-8 relative per element). The indexer quantises q and k to FP8 (3 mantissa bits): elements within that
# distance of an FP8 rounding boundary flip to the neighbouring value, so the scores move by a small fraction of
# their spread, and keys whose score is that close to the k-th largest (near-ties at the selection boundary —
# dense at random init, where thousands of keys per row share a narrow score range) swap in or out of the set.
# The slots are in score order, so each swap also shifts the slots after it: slot agreement says nothing here
# (measured 6% in layer 2 on 4×H100 while the per-token loss agreed to 1.5e-3). What a correct layout must
# still give is the same *set* up to those boundary keys. A broken exchange loses far more: a rank's missing
# keys are 1/cp of every long row's candidates, wrong positions or a non-causal key change whole rows. Hence a
# lower bound on the share of the CP=1 set that is selected, for TP>1 in layers after the first only.
MIN_TOPK_SET_SHARE_TP = 0.9


def _failures(layout: tuple, part: str, rep: dict) -> list[str]:
    tp = layout[0]
    bad = [f"{key} {rep[key]:.3e} > {tol}" for key, tol in TOL.items() if key in rep and rep[key] > tol]
    if rep["grad_max"] > GRAD_MAX_TOL[tp]:
        bad.append(f"grad_max {rep['grad_max']:.3e} ({rep['worst_grad']}) > {GRAD_MAX_TOL[tp]}")
    for layer, (slots, share) in rep["topk_agree"].items():
        if tp == 1 or layer == 1:  # identical indexer inputs (see above): identical top-k, slot by slot
            if slots != 1.0:
                bad.append(f"layer {layer} top-k differs in {1 - slots:.2%} of slots")
        elif share < MIN_TOPK_SET_SHARE_TP:
            bad.append(f"layer {layer} top-k set share {share:.4f} < {MIN_TOPK_SET_SHARE_TP}")
    return bad


def test_layer_and_model_match_cp1_on_nccl():
    world = _world()
    results = run_distributed(_equivalence_worker, world, backend=BACKEND, timeout=900)
    failures = []
    for rank, reports in enumerate(results):
        for layout, parts in reports.items():
            print(f"rank {rank} tp,cp,mode={layout}: {parts}")
            for part, rep in parts.items():
                failures += [f"rank {rank} {part} tp,cp,mode={layout}: {b}" for b in _failures(layout, part, rep)]
    assert not failures, "\n".join(failures)
