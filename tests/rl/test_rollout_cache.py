"""Decode cache and cached attention against the full-sequence reference ops (no model): the cache layout, the
top-k over the FP8 index-key cache and sparse / dense attention over the KV cache, with per-sequence positions
(variable prompt lengths), CP=1 and CP=2 (gloo, cache sharded by sequence, candidate top-k, partial merge)."""

import pytest
import torch

from dsa_dist.ops import dense_attention, fp8_block_quant, lightning_indexer_topk, sparse_attention
from dsa_dist.rl.decode_attention import cache_attention, cache_topk, plan_step
from dsa_dist.rl.kv_cache import CacheLayout, LayerKVCache
from tests._dist import run_distributed

SEED = 1234
B, H, D_QK, D_V, H_I, D_I, TOPK = 3, 4, 24, 16, 2, 32, 5
PREFILL, DECODE = 8, 9  # positions [0, 8) prefilled (zigzag under CP), 9 decode positions after
LENS = [3, 8, 6]  # prompt lengths: decode starts at position P_b − 1 for sequence b


def _data():
    g = torch.Generator().manual_seed(SEED)
    total = PREFILL + DECODE
    q = torch.randn(B, total, H, D_QK, generator=g, dtype=torch.float64)
    kv = torch.randn(B, total, 1, D_QK, generator=g, dtype=torch.float64)  # MLA-style latent: v = kv[..., :D_V]
    q_i = torch.randn(B, total, H_I, D_I, generator=g)
    k_i = torch.randn(B, total, D_I, generator=g)
    w = torch.randn(B, total, H_I, generator=g)
    # Ties on purpose: sequence 0's index keys repeat, so the lowest-position rule decides.
    k_i[0, 4:8] = k_i[0, 0:4]
    qf, qs = fp8_block_quant(q_i, D_I)
    kf, ks = fp8_block_quant(k_i, D_I)
    return q, kv, qf, w * qs.squeeze(-1), kf, ks.squeeze(-1)


def _decode_steps():
    """Per step, the [B] positions fed (each sequence from P_b − 1 on, as rollout decoding does)."""
    lens = torch.tensor(LENS)
    return [lens - 1 + t for t in range(DECODE - 1)]


def _run_cache(cp_size: int, cp_rank: int, sparse: bool, group=None):
    q, kv, qf, w, kf, ks = _data()
    layout = CacheLayout(PREFILL, DECODE, cp_size=cp_size, cp_rank=cp_rank)
    cache = LayerKVCache.allocate(B, layout.rows, kv_heads=1, qk_dim=D_QK, v_dim=D_V, latent=True, index_dim=D_I,
                                  fp8=True, dtype=torch.float64, device=torch.device("cpu"))
    pre = torch.arange(PREFILL).expand(B, -1)
    mine, rows = layout.locate(pre)
    cache.write(mine, rows, kv[:, :PREFILL], None, kf[:, :PREFILL], ks[:, :PREFILL])
    outs, idxs = [], []
    bi = torch.arange(B)
    for pos in _decode_steps():
        plan = plan_step(layout, pos[:, None])
        cache.write(plan.mine, plan.write_rows, kv[bi, pos][:, None], None, kf[bi, pos][:, None],
                    ks[bi, pos][:, None])
        idx = cache_topk(qf[bi, pos][:, None], w[bi, pos][:, None], cache, layout, plan, TOPK, cp_group=group)
        out = cache_attention(q[bi, pos][:, None], cache, layout, plan, idx if sparse else None, 0.3,
                              cp_group=group)
        idxs.append(idx[:, 0])
        outs.append(out[:, 0])
    return torch.stack(idxs, 1), torch.stack(outs, 1)


def _reference_at(b: int, p: int, sparse: bool):
    """Sequence ``b`` alone, full-sequence ops: the top-k and output of its row at position ``p``."""
    q, kv, qf, w, kf, ks = _data()
    sl = slice(b, b + 1)
    idx = lightning_indexer_topk(qf[sl, p:p + 1], kf[sl, : p + 1], w[sl, p:p + 1], TOPK, ks[sl, : p + 1],
                                 q_positions=torch.tensor([p]))[1]
    k = kv[sl, : p + 1]
    if sparse:
        o = sparse_attention(q[sl, p:p + 1], k, k[..., :D_V], idx, 0.3)[0]
    else:
        o = dense_attention(q[sl, p:p + 1], k, k[..., :D_V], 0.3, q_positions=torch.tensor([p]))[0]
    return idx[0, 0], o[0, 0]


def _reference(sparse: bool):
    idxs, outs = [], []
    for pos in _decode_steps():
        step = [_reference_at(b, int(pos[b]), sparse) for b in range(B)]
        idxs.append(torch.stack([s[0] for s in step]))
        outs.append(torch.stack([s[1] for s in step]))
    return torch.stack(idxs, 1), torch.stack(outs, 1)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_layout_partitions_positions(cp_size):
    layouts = [CacheLayout(PREFILL, DECODE, cp_size=cp_size, cp_rank=r) for r in range(cp_size)]
    cap = layouts[0].capacity
    assert cap >= PREFILL + DECODE
    got = torch.sort(torch.cat([lay.positions for lay in layouts])).values
    assert torch.equal(got, torch.arange(cap))  # every position on exactly one rank
    for r, lay in enumerate(layouts):
        assert bool((lay.positions[1:] > lay.positions[:-1]).all())  # ascending: local tie-break = global
        mine, rows = lay.locate(lay.positions[None])
        assert bool(mine.all()) and torch.equal(rows[0], torch.arange(lay.rows))
        assert torch.equal(lay.to_local(lay.positions.int()), torch.arange(lay.rows, dtype=torch.int32))
        others = [o.positions for j, o in enumerate(layouts) if j != r] + [torch.tensor([-1])]
        assert bool((lay.to_local(torch.cat(others).int()) == -1).all())
    with pytest.raises(ValueError, match="capacity"):
        layouts[0].locate(torch.tensor([[cap]]))


@pytest.mark.parametrize("sparse", [True, False])
def test_cached_decode_matches_full_sequence_ops(sparse):
    idx, out = _run_cache(1, 0, sparse)
    ref_idx, ref_out = _reference(sparse)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert (idx[:, 0] >= 0).sum() < B * TOPK  # short rows do have empty slots: the −1 path is exercised


def _cp_worker(rank: int, world: int, sparse: bool):
    return _run_cache(world, rank, sparse)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sparse", [True, False])
def test_cached_decode_cp2_matches_cp1(sparse):
    ref_idx, ref_out = _run_cache(1, 0, sparse)
    for idx, out in run_distributed(_cp_worker, 2, sparse):
        assert torch.equal(idx, ref_idx)  # candidate all-gather top-k = single-rank top-k, ties included
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sparse", [True, False])
def test_multi_token_step_matches_reference(sparse):
    """Two new tokens per sequence in one step (n = 2, per-sequence positions): both rows as the reference."""
    q, kv, qf, w, kf, ks = _data()
    layout = CacheLayout(PREFILL, DECODE, cp_size=1, cp_rank=0)
    cache = LayerKVCache.allocate(B, layout.rows, kv_heads=1, qk_dim=D_QK, v_dim=D_V, latent=True, index_dim=D_I,
                                  fp8=True, dtype=torch.float64, device=torch.device("cpu"))
    pos = torch.tensor(LENS)[:, None] + torch.tensor([4, 5])  # [B, 2]
    before = torch.arange(int(pos.max())).expand(B, -1)  # every earlier position written (as decode would have)
    mine, rows = layout.locate(before)
    n = before.shape[1]
    cache.write(mine, rows, kv[:, :n], None, kf[:, :n], ks[:, :n])
    bi = torch.arange(B)[:, None]
    plan = plan_step(layout, pos)
    cache.write(plan.mine, plan.write_rows, kv[bi, pos], None, kf[bi, pos], ks[bi, pos])
    idx = cache_topk(qf[bi, pos], w[bi, pos], cache, layout, plan, TOPK)
    out = cache_attention(q[bi, pos], cache, layout, plan, idx if sparse else None, 0.3)
    for b in range(B):
        for j in range(2):
            ref_idx, ref_out = _reference_at(b, int(pos[b, j]), sparse)
            assert torch.equal(idx[b, j], ref_idx)
            torch.testing.assert_close(out[b, j], ref_out, rtol=1e-10, atol=1e-10)
