"""Context-parallel primitives on real gloo process groups (2 and 4 ranks) against single-rank computations.

Every rank builds the same full-sequence inputs from one seed, computes the CP=1 reference itself with the
reference ops, takes its zigzag shard and checks the CP result against the reference's shard. One spawned group
per test; shapes are tiny so the whole file runs in well under a minute on 2 cores.
"""

import pytest
import torch
import torch.distributed as dist

from dsa_dist.ops import (
    dense_attention,
    fp8_block_quant,
    indexer_kl_loss_dense,
    indexer_kl_loss_sparse,
    lightning_indexer_scores,
    lightning_indexer_topk,
    sparse_attention,
)
from dsa_dist.parallel import _comm
from dsa_dist.parallel.context_parallel import (
    TOPK_MODES,
    all_gather_sequence,
    candidate_topk,
    distributed_indexer_topk,
    zigzag_positions,
    zigzag_split,
)
from tests._dist import run_distributed

WORLD_SIZES = [2, 4]


def _exact(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# zigzag vs Megatron, all_gather_sequence forward/backward, reduce-scatter fallback
# ----------------------------------------------------------------------------------------------------------------
def _primitives_worker(rank: int, ws: int) -> dict:
    torch.manual_seed(0)
    group = dist.new_group(list(range(ws)))  # a non-default group, as the model passes Megatron's CP group
    L = 4 * ws
    tokens = torch.arange(3 * L).reshape(3, L)
    try:
        from megatron.core.utils import get_batch_on_this_cp_rank
    except ImportError:
        get_batch_on_this_cp_rank = None
    if get_batch_on_this_cp_rank is not None:
        ref = get_batch_on_this_cp_rank({"tokens": tokens.clone(), "labels": tokens.clone() + 1}, cp_group=group)
        _exact(zigzag_split(tokens, 1, ws, rank), ref["tokens"], "zigzag_split vs Megatron get_batch_on_this_cp_rank")
        _exact(zigzag_split(tokens + 1, 1, ws, rank), ref["labels"], "labels")
        _exact(zigzag_positions(L, ws, rank), ref["tokens"][0], "zigzag_positions vs Megatron")

    # Forward: gathered == full tensor, for several seq dims and dtypes (bf16 / fp8 travel as bytes).
    full = torch.randn(L, 2, L, 3)
    for seq_dim in (0, -2):
        for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
            f = full.to(dtype)
            shard = zigzag_split(f, seq_dim, ws, rank)
            got = all_gather_sequence(shard, seq_dim, group)
            assert got.dtype == dtype
            _exact(got.view(torch.uint8) if dtype == torch.float8_e4m3fn else got,
                   f.view(torch.uint8) if dtype == torch.float8_e4m3fn else f, f"gather {dtype} dim {seq_dim}")

    # Backward vs CP=1: each rank's "loss" is its own function of the gathered tensor; the CP=1 equivalent is
    # the sum of all ranks' losses of the full tensor. Weights differ per rank so a wrong owner/sum shows.
    x_full = torch.randn(2, L, 3, dtype=torch.float64)
    weights = torch.randn(ws, 2, L, 3, dtype=torch.float64)

    def loss_of(y, r):
        return (torch.sin(y) * weights[r]).sum() + (y[:, : L // 2] ** 2).sum() * (r + 1)

    x_ref = x_full.clone().requires_grad_(True)
    sum(loss_of(x_ref, r) for r in range(ws)).backward()
    grads = {}
    for method in ("auto", "reduce_scatter", "all_reduce", "async"):
        shard = zigzag_split(x_full, 1, ws, rank).clone().requires_grad_(True)
        if method == "async":
            pending = all_gather_sequence(shard, 1, group, async_op=True)
            y = pending.wait()
        else:
            y = all_gather_sequence(shard, 1, group, reduce_scatter_method=method)
        loss_of(y, rank).backward()
        torch.testing.assert_close(shard.grad, zigzag_split(x_ref.grad, 1, ws, rank), rtol=1e-12, atol=1e-12)
        grads[method] = shard.grad
    # the reduce-scatter and the all-reduce + slice fallback give the same sum
    _exact(grads["reduce_scatter"], grads["all_reduce"], "reduce_scatter vs all_reduce fallback")

    # bf16 shard: gradient comes back in bf16, accumulated in fp32 (sum of ws equal small values stays exact)
    shard = torch.ones(1, L // ws, dtype=torch.bfloat16, requires_grad=True)
    (all_gather_sequence(shard, 1, group).float() * (1.0 / 3.0)).sum().backward()
    assert shard.grad.dtype == torch.bfloat16
    torch.testing.assert_close(shard.grad.float(), torch.full((1, L // ws), ws / 3.0), rtol=1e-2, atol=0)

    # reduce_scatter_stacked directly: integer-valued fp32, both methods, result = sum of every rank's slice
    stacked = torch.arange(ws * 4, dtype=torch.float32).reshape(ws, 4) * (rank + 1)
    expect = torch.arange(rank * 4, rank * 4 + 4, dtype=torch.float32) * (ws * (ws + 1) / 2)
    for method in ("reduce_scatter", "all_reduce"):
        _exact(_comm.reduce_scatter_stacked(stacked, group, method=method), expect, f"reduce_scatter {method}")
    return {"ok": True}


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_zigzag_and_all_gather_sequence_multirank(ws):
    assert all(r["ok"] for r in run_distributed(_primitives_worker, ws))


# ----------------------------------------------------------------------------------------------------------------
# distributed indexer top-k (allgather / ring / candidates) and candidate_topk
# ----------------------------------------------------------------------------------------------------------------
def _integer_indexer_inputs(b, L, h, d):
    """FP8 queries/keys with small integer values and power-of-two scales: every score is an exact integer,
    so many scores tie and any tie-break mistake changes the indices."""
    q = torch.randint(-2, 3, (b, L, h, d)).float().to(torch.float8_e4m3fn)
    k = torch.randint(-2, 3, (b, L, d)).float().to(torch.float8_e4m3fn)
    w = torch.randint(-1, 3, (b, L, h)).float()
    s = (2.0 ** torch.randint(0, 2, (b, L))).float()
    return q, w, k, s


def _has_boundary_ties(q, k, w, s, topk):
    scores = lightning_indexer_scores(q, k, w, s)  # [B, L, L]
    ordered = scores.sort(-1, descending=True).values
    kth, nxt = ordered[..., topk - 1], ordered[..., topk]
    return bool((torch.isfinite(nxt) & (kth == nxt)).any())


def _topk_worker(rank: int, ws: int, row_chunks: bool = False) -> dict:
    if row_chunks:  # merge one query row at a time (the chunked merge that bounds memory at long lengths)
        import dsa_dist.parallel.distributed_topk as dtk

        dtk.MERGE_BUDGET_BYTES = 1
    torch.manual_seed(1)
    group = dist.group.WORLD
    b, L, h, d, topk = 2, 8 * ws, 2, 8, 6  # topk > L/CP/2 and > t+1 for the first rows
    shard = lambda x: zigzag_split(x, 1, ws, rank)  # noqa: E731
    cases = {}
    q, w, k, s = _integer_indexer_inputs(b, L, h, d)
    assert _has_boundary_ties(q, k, w, s, topk), "test inputs must contain ties at the top-k boundary"
    cases["fp8_integer_ties"] = (q, w, k, s, None)
    qf, kf = torch.randn(b, L, h, d), torch.randn(b, L, d)
    cases["float_keys_no_scale"] = (qf, torch.randn(b, L, h), kf, None, None)
    # Positions that are not the rows (pairs of tokens share a position): remote key positions must travel.
    cases["explicit_positions"] = (q, w, k, s, torch.arange(L) // 2)

    for name, (q, w, k, s, positions) in cases.items():
        ref_s, ref_i = lightning_indexer_topk(q, k, w, topk, s, q_positions=positions, k_positions=positions)
        assert (ref_i == -1).any(), "some rows must have fewer than k causal keys"
        kw = {}
        if positions is not None:
            kw = dict(q_positions=shard(positions[None])[0], k_positions_local=shard(positions[None])[0])
        for mode in TOPK_MODES:
            got_s, got_i = distributed_indexer_topk(shard(q), shard(w), shard(k), None if s is None else shard(s),
                                                    topk, group=group, mode=mode, **kw,
                                                    chunk_size=3 if name == "explicit_positions" else None)
            assert got_i.dtype == torch.int32 and got_s.dtype == torch.float32
            _exact(got_i, shard(ref_i), f"{name}/{mode} indices")
            if name == "float_keys_no_scale":  # scores of random floats may differ in the last bit by GEMM shape
                torch.testing.assert_close(got_s, shard(ref_s), rtol=1e-6, atol=1e-6)
            else:
                _exact(got_s, shard(ref_s), f"{name}/{mode} scores")

    # Queries that are a subset of the shard (the rows one of 2 TP ranks scores), with explicit positions.
    q, w, k, s, _ = cases["fp8_integer_ties"]
    ref_s, ref_i = lightning_indexer_topk(q, k, w, topk, s)
    for mode in TOPK_MODES:
        for tp_rank in range(2):
            rows = lambda x, j=tp_rank: shard(x)[:, j::2]  # noqa: E731
            got_s, got_i = distributed_indexer_topk(rows(q), rows(w), shard(k), shard(s), topk, group=group,
                                                    mode=mode, q_positions=rows(torch.arange(L)[None])[0])
            _exact(got_i, rows(ref_i), f"TP-row subset/{mode} indices")
            _exact(got_s, rows(ref_s), f"TP-row subset/{mode} scores")

    # candidate_topk: same queries everywhere, contiguous key shards of unequal length (rank r holds 2 + r keys).
    sizes = [2 + r for r in range(ws)]
    n = sum(sizes)
    q, w, k, s = _integer_indexer_inputs(1, n, h, d)
    q_dec, w_dec = q[:, [1, n // 2, n - 1]], w[:, [1, n // 2, n - 1]]  # decode queries; the first sees 2 keys
    q_pos = torch.tensor([1, n // 2, n - 1])
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    k_pos_local = torch.arange(n)[local]
    ref_s, ref_i = lightning_indexer_topk(q_dec, k, w_dec, topk, s, q_positions=q_pos, k_positions=torch.arange(n))
    got_s, got_i = candidate_topk(q_dec, w_dec, k[:, local], s[:, local], topk, q_positions=q_pos,
                                  k_positions_local=k_pos_local, group=group)
    _exact(got_i, ref_i, "candidate_topk indices")
    _exact(got_s, ref_s, "candidate_topk scores")
    cand_s, cand_i = got_s, got_i
    # cache slots named by their own global ids (here position + 100): indices come back in that naming
    _, slot_i = candidate_topk(q_dec, w_dec, k[:, local], s[:, local], topk, q_positions=q_pos,
                               k_positions_local=k_pos_local, k_indices_local=k_pos_local + 100, group=group)
    _exact(slot_i, torch.where(ref_i >= 0, ref_i + 100, -1), "candidate_topk with k_indices_local")

    if ws == 4:
        # CP groups that are not the world and whose group ranks differ from global ranks ({0,2} and {1,3}, as
        # with TP=2 × CP=2): ring peers and gathers must address the group, not the world.
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        cp_group, cp_rank = groups[rank % 2], rank // 2
        q, w, k, s = _integer_indexer_inputs(b, 8, h, d)
        ref_s, ref_i = lightning_indexer_topk(q, k, w, topk, s)
        sub = lambda x: zigzag_split(x, 1, 2, cp_rank)  # noqa: E731
        for mode in TOPK_MODES:
            got_s, got_i = distributed_indexer_topk(sub(q), sub(w), sub(k), sub(s), topk, group=cp_group, mode=mode)
            _exact(got_i, sub(ref_i), f"subgroup/{mode} indices")
            _exact(got_s, sub(ref_s), f"subgroup/{mode} scores")
        x = torch.randn(2, 8, 3, dtype=torch.float64)
        xs = sub(x).requires_grad_(True)
        y = all_gather_sequence(xs, 1, cp_group)
        _exact(y, x, "subgroup all_gather_sequence")
        (y * (cp_rank + 1)).sum().backward()  # grad of every row summed over the 2 CP ranks: 1 + 2
        _exact(xs.grad, torch.full_like(xs, 3.0), "subgroup gather backward")
    return {"cand_s": cand_s, "cand_i": cand_i}


@pytest.mark.parametrize("ws,row_chunks", [(ws, False) for ws in WORLD_SIZES] + [(2, True)])
def test_distributed_topk_equals_single_rank(ws, row_chunks):
    results = run_distributed(_topk_worker, ws, row_chunks)
    for r in results[1:]:  # candidate_topk: identical on every rank
        _exact(r["cand_i"], results[0]["cand_i"], "candidate indices across ranks")
        _exact(r["cand_s"], results[0]["cand_s"], "candidate scores across ranks")


# ----------------------------------------------------------------------------------------------------------------
# end to end at op level: top-k + sparse attention + KL (and dense attention + dense KL), outputs and grads
# ----------------------------------------------------------------------------------------------------------------
def _e2e_worker(rank: int, ws: int, mode: str) -> dict:
    torch.manual_seed(2)
    group = dist.new_group(list(range(ws)))
    b, L, H, d_qk, d_v, h_i, d_i, topk = 2, 4 * ws, 4, 16, 12, 2, 16, 5
    f64 = dict(dtype=torch.float64)
    full = {
        "q": torch.randn(b, L, H, d_qk, **f64),
        "kv": torch.randn(b, L, 1, d_qk, **f64),  # MLA-style latent: K = kv, V = kv[..., :d_v]
        "q_index": torch.randn(b, L, h_i, d_i, **f64),
        "k_index": torch.randn(b, L, d_i, **f64),
        "weights": torch.randn(b, L, h_i, **f64),
    }
    out_grad = torch.randn(b, L, H, d_v, **f64)

    def indexer_fp8(q_index, k_index, weights):
        # per-token quantisation: a shard's values equal the corresponding rows of the full quantisation
        qq, qs = fp8_block_quant(q_index.detach(), d_i)
        kq, ks = fp8_block_quant(k_index.detach(), d_i)
        return qq, weights.detach() * qs.squeeze(-1), kq, ks.squeeze(-1)

    def sparse_stage(t, idx, kv_all, k_index_all, g):
        out, lse = sparse_attention(t["q"], kv_all, kv_all[..., :d_v], idx)
        kl = indexer_kl_loss_sparse(t["q"], kv_all, t["q_index"], k_index_all, t["weights"], idx, attn_lse=lse,
                                    reduction="sum")
        return out, (out * g).sum() + kl

    def dense_stage(t, kv_all, k_index_all, g, q_pos):
        out, lse = dense_attention(t["q"], kv_all, kv_all[..., :d_v], q_positions=q_pos,
                                   k_positions=torch.arange(L))
        kl = indexer_kl_loss_dense(t["q"], kv_all, t["q_index"], k_index_all, t["weights"], attn_lse=lse,
                                   q_positions=q_pos, k_positions=torch.arange(L), reduction="sum")
        return out, (out * g).sum() + kl

    def leaves(src):
        return {n: v.detach().clone().requires_grad_(True) for n, v in src.items()}

    pos = zigzag_positions(L, ws, rank)
    report = {}
    for stage in ("sparse", "dense"):
        # CP = 1 reference on this rank
        ref = leaves(full)
        if stage == "sparse":
            qq, ww, kq, ks = indexer_fp8(ref["q_index"], ref["k_index"], ref["weights"])
            _, ref_idx = lightning_indexer_topk(qq, kq, ww, topk, ks)
            ref_out, ref_loss = sparse_stage(ref, ref_idx, ref["kv"], ref["k_index"], out_grad)
        else:
            ref_out, ref_loss = dense_stage(ref, ref["kv"], ref["k_index"], out_grad, torch.arange(L))
        ref_loss.backward()

        # CP: local shards; KV gather started before the top-k so it overlaps the indexer
        loc = leaves({n: zigzag_split(v, 1, ws, rank) for n, v in full.items()})
        g = zigzag_split(out_grad, 1, ws, rank)
        kv_pending = all_gather_sequence(loc["kv"], 1, group, async_op=True)
        k_index_all = all_gather_sequence(loc["k_index"], 1, group)  # float keys for the KL, differentiable
        if stage == "sparse":
            qq, ww, kq, ks = indexer_fp8(loc["q_index"], loc["k_index"], loc["weights"])
            _, idx = distributed_indexer_topk(qq, ww, kq, ks, topk, q_positions=pos, k_positions_local=pos,
                                              group=group, mode=mode)
            _exact(idx, zigzag_split(ref_idx, 1, ws, rank), f"e2e top-k ({mode})")
            out, loss = sparse_stage(loc, idx, kv_pending.wait(), k_index_all, g)
        else:
            out, loss = dense_stage(loc, kv_pending.wait(), k_index_all, g, pos)
        loss.backward()

        torch.testing.assert_close(out, zigzag_split(ref_out, 1, ws, rank), rtol=1e-12, atol=1e-12)
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-12, atol=1e-12)
        for name in full:  # dq, dKV (reduce-scattered), d q_index, d k_index (reduce-scattered), d weights
            torch.testing.assert_close(loc[name].grad, zigzag_split(ref[name].grad, 1, ws, rank), rtol=1e-10,
                                       atol=1e-12, msg=lambda m, n=f"{stage}/{name}": f"grad of {n}: {m}")
            report[f"{stage}/{name}"] = float(loc[name].grad.abs().max())
    return report


@pytest.mark.parametrize("ws,mode", [(2, "ring"), (4, "ring"), (4, "allgather"), (2, "candidates")])
def test_end_to_end_cp_equals_cp1(ws, mode):
    results = run_distributed(_e2e_worker, ws, mode)
    # every gradient is non-trivial on every rank (a zero grad would make the comparison vacuous)
    for r in results:
        assert all(v > 0 for v in r.values()), r
