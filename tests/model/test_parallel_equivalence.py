"""TP × CP equivalence on real gloo ranks: a DSA layer and a 2-layer model give the TP=1/CP=1 top-k indices,
outputs, LM loss, indexer loss, input and parameter gradients (float32), for MLA and GQA, dense and sparse.

Every layout starts from the same weights: models are built with the same seed and ``use_cpu_initialization``
(Megatron initialises each full master matrix and slices the TP shard). Gradients are compared in the form the
optimizer sees them: indexer gradients averaged over TP (``sync_indexer_grads``, as Megatron's
``finalize_model_grads`` does), every gradient averaged over CP (as Megatron's DDP over DP×CP does), TP shards
gathered to full matrices. Losses are per-rank means over local rows, averaged over CP (and TP for the KL).
"""

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_distributed

SEQ, BATCH, SEED = 64, 2, 1234
LAYER_CASES = [("tiny", "sparse"), ("tiny-gqa", "sparse"), ("tiny", "dense"), ("tiny-gqa", "dense")]
MODEL_CASES = [("tiny", "sparse"), ("tiny-gqa", "dense")]


# CP top-k exchange per layout: every mode of distributed_indexer_topk is exercised inside the model.
CP_TOPK_MODE = {1: "ring", 2: "ring", 4: "allgather"}
CP_TOPK_MODE_TP2 = {2: "candidates", 4: "ring"}


def _cfg(name, dims):
    from tests.model._configs import model_config

    topk_mode = (CP_TOPK_MODE_TP2 if dims.tp > 1 else CP_TOPK_MODE).get(dims.cp, "ring")
    return model_config(name, init_std=0.2, indexer={"topk": 12, "cp_topk_mode": topk_mode}, seq_len=SEQ)


def _runtime(mode):
    """'dense': the warm-up stage (dense attention + dense KL); 'sparse': sparse training (top-k + sparse KL)."""
    from dsa_dist.model.runtime import SPARSE_TRAIN, WARMUP

    return SPARSE_TRAIN if mode == "sparse" else WARMUP


def _gather_tp(t, p, dims):
    """Full tensor of a TP-sharded parameter (or its grad), honouring Megatron's partition stride (SwiGLU fc1
    holds [gate_r; up_r] on rank r: stride 2)."""
    if not getattr(p, "tensor_model_parallel", False) or dims.tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dims.tp)]
    dist.all_gather(parts, t.contiguous(), group=dims.tp_group)
    stride = getattr(p, "partition_stride", 1)
    dim = p.partition_dim
    pieces = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(dims.tp)], dim=dim)


def _full_grads(module, dims):
    """name -> gradient of the full (TP-gathered) parameter, indexer grads averaged over TP, all over CP."""
    from dsa_dist.model.indexer import sync_indexer_grads

    sync_indexer_grads(module, dims.tp_group)
    out = {}
    for name, p in module.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = g.detach().clone()
        if dims.cp > 1:
            dist.all_reduce(g, group=dims.cp_group)
            g /= dims.cp
        out[name] = _gather_tp(g, p, dims)
    return out


def _full_params(module, dims):
    out = {}
    for name, p in module.named_parameters():
        out[name] = _gather_tp(p.detach().clone(), p, dims)
    return out


def _split(x, seq_dim, dims):
    from dsa_dist.parallel import zigzag_split

    return zigzag_split(x, seq_dim, dims.cp, dims.cp_rank) if dims.cp > 1 else x


def _layer_case(name, mode, dims):
    from megatron.core.transformer.spec_utils import build_module

    from dsa_dist.model.indexer_loss import IndexerLossTracker
    from dsa_dist.model.specs import dsa_attention_spec

    cfg = _cfg(name, dims)
    tracker = IndexerLossTracker()
    torch.manual_seed(SEED)
    attn = build_module(dsa_attention_spec(cfg, _runtime(mode), tracker), config=cfg.to_transformer_config(None),
                        layer_number=1)
    gen = torch.Generator().manual_seed(SEED + 1)
    x_full = torch.randn(SEQ, BATCH, cfg.hidden_size, generator=gen)
    g_full = torch.randn(SEQ, BATCH, cfg.hidden_size, generator=gen)
    x = _split(x_full, 0, dims).requires_grad_(True)
    tracker.begin_forward(record_topk=True)
    out, _ = attn(x, None)
    loss = (out * _split(g_full, 0, dims)).sum() / x.shape[0] + tracker.total()
    loss.backward()
    x_grad = x.grad.clone()
    if dims.cp > 1:  # each CP rank's loss is a mean over its rows: the global mean is their average
        x_grad /= dims.cp
    positions = dims.local_positions(x.shape[0])
    return {
        "positions": positions, "out": out.detach(), "x_grad": x_grad,
        "kl": tracker.values(reduce=True)[1], "topk": (positions, tracker.topk()[1]),
        "grads": _full_grads(attn, dims), "params": _full_params(attn, dims),
    }


def _model_case(name, mode, dims):
    from dsa_dist.model.builder import build_model, get_indexer_loss_tracker

    cfg = _cfg(name, dims)
    torch.manual_seed(SEED)
    model = build_model(cfg, runtime=_runtime(mode))
    tracker = get_indexer_loss_tracker(model)
    gen = torch.Generator().manual_seed(SEED + 2)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
    inputs, labels = _split(tokens[:, :-1], 1, dims), _split(tokens[:, 1:], 1, dims)
    tracker.begin_forward(record_topk=True)
    per_token = model(inputs.contiguous(), None, None, labels=labels.contiguous())  # [b, s_local]
    lm = per_token.mean()
    (lm + tracker.total()).backward()
    recorded = tracker.topk()
    replay_equal = None
    if mode == "sparse":  # GRPO's top-k replay on this layout: the recorded indices give the same forward
        tracker.begin_forward(replay_topk=recorded)
        with torch.no_grad():
            replayed = model(inputs.contiguous(), None, None, labels=labels.contiguous())
        replay_equal = torch.equal(replayed, per_token)
    lm_value = lm.detach().clone()
    if dims.cp > 1:
        dist.all_reduce(lm_value, group=dims.cp_group)
        lm_value /= dims.cp
    positions = dims.local_positions(inputs.shape[1])
    return {
        "positions": positions, "per_token": per_token.detach(),
        "lm": lm_value.item(), "kl": tracker.values(reduce=True),
        "topk": {layer: (positions, idx) for layer, idx in recorded.items()}, "replay_equal": replay_equal,
        "grads": _full_grads(model, dims),
    }


def _worker(rank, world, layouts):
    from dsa_dist.parallel import init_parallel

    results = {}
    for tp, cp in layouts:
        dims = init_parallel(tp, cp)
        for name, mode in LAYER_CASES:
            results[(tp, cp, "layer", name, mode)] = _layer_case(name, mode, dims)
        for name, mode in MODEL_CASES:
            results[(tp, cp, "model", name, mode)] = _model_case(name, mode, dims)
        results[(tp, cp, "coords")] = (dims.tp_rank, dims.cp_rank)
    return results


def _assemble(per_rank, key, field, seq_dim):
    """Full-sequence tensor from the ranks' local shards (placed by their global positions)."""
    parts = [(r[key]["positions"], r[key][field]) for r in per_rank]
    pos, val = parts[0]
    shape = list(val.shape)
    shape[seq_dim] = SEQ
    full = torch.full(shape, float("nan"), dtype=val.dtype)
    for pos, val in parts:
        full.index_copy_(seq_dim, pos, val)
    return full


def _assemble_topk(per_rank, layer_key):
    full = None
    for r in per_rank:
        pos, idx = layer_key(r)
        if full is None:
            full = torch.full((idx.shape[0], SEQ, idx.shape[2]), -2, dtype=idx.dtype)
        seen = full[:, pos]
        # TP peers hold the same rows: they must have selected the same keys.
        assert ((seen == -2) | (seen == idx)).all(), "TP peers recorded different top-k indices"
        full[:, pos] = idx
    return full


def _close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _compare(ref, per_rank, layout):
    tp, cp = layout
    tol = {"rtol": 2e-5, "atol": 2e-6}
    for name, mode in LAYER_CASES:
        key = (tp, cp, "layer", name, mode)
        r0 = ref[(1, 1, "layer", name, mode)]
        where = f"layer {name} {mode} tp={tp} cp={cp}"
        for n, w in r0["params"].items():  # same starting weights
            _close(per_rank[0][key]["params"][n], w, rtol=0, atol=0, what=f"{where} init {n}")
        _close(_assemble(per_rank, key, "out", 0), r0["out"], **tol, what=f"{where} out")
        _close(_assemble(per_rank, key, "x_grad", 0), r0["x_grad"], **tol, what=f"{where} dx")
        assert per_rank[0][key]["kl"] == pytest.approx(r0["kl"], rel=1e-5), where
        if mode == "sparse":
            topk = _assemble_topk(per_rank, lambda r, k=key: r[k]["topk"])
            assert torch.equal(topk, r0["topk"][1]), f"{where} top-k indices differ"
        for r in per_rank:
            for n, g in r0["grads"].items():
                _close(r[key]["grads"][n], g, rtol=1e-4, atol=1e-6, what=f"{where} grad {n}")
    for name, mode in MODEL_CASES:
        key = (tp, cp, "model", name, mode)
        r0 = ref[(1, 1, "model", name, mode)]
        where = f"model {name} {mode} tp={tp} cp={cp}"
        _close(_assemble(per_rank, key, "per_token", 1), r0["per_token"], **tol, what=f"{where} per-token loss")
        assert per_rank[0][key]["lm"] == pytest.approx(r0["lm"], rel=1e-6), where
        for layer, kl in r0["kl"].items():
            assert per_rank[0][key]["kl"][layer] == pytest.approx(kl, rel=1e-5), f"{where} KL layer {layer}"
        if mode == "sparse":
            assert all(r[key]["replay_equal"] for r in per_rank), f"{where}: replaying the top-k changed the loss"
            for layer in r0["topk"]:
                topk = _assemble_topk(per_rank, lambda r, k=key, ly=layer: r[k]["topk"][ly])
                assert torch.equal(topk, r0["topk"][layer][1]), f"{where} top-k layer {layer}"
        for r in per_rank:
            for n, g in r0["grads"].items():
                _close(r[key]["grads"][n], g, rtol=1e-4, atol=1e-6, what=f"{where} grad {n}")


@pytest.fixture(scope="module")
def reference_and_world2():
    per_rank = run_distributed(_worker, 2, [(1, 1), (2, 1), (1, 2)], timeout=300)
    ref = {k[:1] + k[1:]: v for k, v in per_rank[0].items() if k[:2] == (1, 1)}
    return ref, per_rank


def _ranks_of(per_rank, layout):
    return [{k: v for k, v in r.items() if k[:2] == layout} for r in per_rank]


def test_reference_is_consistent(reference_and_world2):
    ref, per_rank = reference_and_world2
    # The reference has a real signal: non-trivial KL, top-k rows with -1 padding at the start.
    key = (1, 1, "layer", "tiny", "sparse")
    assert ref[key]["kl"] > 1e-3
    pos, idx = ref[key]["topk"]
    assert (idx[:, 0, 1:] == -1).all() and (idx[:, -1] >= 0).all()
    assert ref[(1, 1, "model", "tiny", "sparse")]["replay_equal"]
    # Two DP replicas of TP1/CP1 agree exactly.
    torch.testing.assert_close(per_rank[1][key]["out"], ref[key]["out"], rtol=0, atol=0)


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)])
def test_world2_layouts_match_reference(reference_and_world2, layout):
    ref, per_rank = reference_and_world2
    _compare(ref, _ranks_of(per_rank, layout), layout)


def test_world4_layouts_match_reference(reference_and_world2):
    ref, _ = reference_and_world2
    per_rank = run_distributed(_worker, 4, [(1, 4), (2, 2)], timeout=400)
    for layout in [(1, 4), (2, 2)]:
        _compare(ref, _ranks_of(per_rank, layout), layout)


def test_world8_tp2_cp4_matches_reference(reference_and_world2):
    ref, _ = reference_and_world2
    per_rank = run_distributed(_worker, 8, [(2, 4)], timeout=400)
    _compare(ref, _ranks_of(per_rank, (2, 4)), (2, 4))
