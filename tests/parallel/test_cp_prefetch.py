"""The CP exchanges that overlap compute (docs/context_parallel.md, "Overlap"), on 2 gloo ranks, against the
in-line versions and float64 math:

- ``all_gather_sequence(..., defer_backward=True)``: the same gradients as the in-line reduce-scatter (also when
  the shard has a second use whose gradient meets the deferred one), and the wait for the reduce-scatter happens
  only when the shard's producer runs its backward — after the backward of work made later in the forward;
- ``start_index_key_gather`` + ``distributed_indexer_topk(prefetched_keys=...)``: the same top-k as the in-line
  key exchange, and clear errors when the prefetch does not match the call;
- the model's positions contract: the distributed top-k is given no key positions, so a DSA layer under CP
  rejects positions that are not the zigzag ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_distributed

SEED = 11


def _deferred_worker(rank: int, world: int) -> dict:
    from dsa_dist.parallel import _comm, all_gather_sequence

    torch.manual_seed(SEED)  # the same tensors on every rank; each takes its shard
    full_a = torch.randn(2, 16, 3, dtype=torch.float64)
    w = torch.randn(2, 16, 3, dtype=torch.float64)
    from dsa_dist.parallel import zigzag_split

    real_wait = _comm.PendingReduceScatter.wait
    order: list[str] = []

    def logged_wait(self):
        order.append("reduce-scatter waited")
        return real_wait(self)

    results = {}
    for defer in (False, True):
        a = zigzag_split(full_a, 1, world, rank).clone().requires_grad_(True)
        b = torch.randn(2, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(rank),
                        requires_grad=True)
        order.clear()
        x = a * 2.0  # the shard: made first, so its backward node runs last
        pending = all_gather_sequence(x, 1, None, async_op=True, defer_backward=defer)
        # (after the gather's own pre-hook: hooks run in the order they were registered)
        x.grad_fn.register_prehook(lambda g: order.append("shard producer") or None)  # noqa: B023
        y = b * 3.0  # work made after the shard, independent of the gather
        y.grad_fn.register_prehook(lambda g: order.append("later work") or None)  # noqa: B023
        full = pending.wait()
        # x has a second use: its gradient there meets the reduce-scatter's at the same node.
        loss = (full * w).sum() + (x ** 2).sum() + y.sum()
        _comm.PendingReduceScatter.wait = logged_wait
        try:
            loss.backward()
        finally:
            _comm.PendingReduceScatter.wait = real_wait
        results[defer] = {"grad_a": a.grad.clone(), "grad_b": b.grad.clone(), "order": list(order)}
    return results


@pytest.mark.timeout(120)
def test_deferred_reduce_scatter_matches_inline_and_waits_at_the_consumer():
    print(f"seed {SEED}")
    res = run_distributed(_deferred_worker, 2, timeout=100)
    torch.manual_seed(SEED)
    full_a = torch.randn(2, 16, 3, dtype=torch.float64)
    w = torch.randn(2, 16, 3, dtype=torch.float64)
    from dsa_dist.parallel import zigzag_split

    for rank, r in enumerate(res):
        # d/da of sum_r (gather(2a) · w) + sum (2a)^2 = 2·w[own rows] · 2 (one copy of w per rank) + 8a
        a = zigzag_split(full_a, 1, 2, rank)
        expected = 2.0 * 2 * zigzag_split(w, 1, 2, rank) + 8.0 * a
        for defer in (False, True):
            torch.testing.assert_close(r[defer]["grad_a"], expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(r[defer]["grad_b"], torch.full_like(r[defer]["grad_b"], 3.0))
        # In line: nothing waits later (the gather's backward blocks on its own collective).
        assert "reduce-scatter waited" not in r[False]["order"]
        # Deferred: the later work's backward runs first, the wait comes when the shard's producer consumes it.
        assert r[True]["order"] == ["later work", "reduce-scatter waited", "shard producer"], r[True]["order"]


def _prefetch_worker(rank: int, world: int) -> dict:
    from dsa_dist.ops import prepare_indexer_qk
    from dsa_dist.parallel import distributed_indexer_topk, start_index_key_gather, zigzag_split

    torch.manual_seed(SEED)
    b, length, heads, d, topk = 1, 64, 2, 16, 8
    q = torch.randn(b, length, heads, d)
    k = torch.randn(b, length, d)
    w = torch.rand(b, length, heads)
    p = prepare_indexer_qk(q, k, w, rope_dim=0, fp8=True)
    shard = [zigzag_split(t, 1, world, rank).contiguous() for t in (p.q_index, p.weights, p.k_index, p.k_scale)]
    inline = distributed_indexer_topk(*shard[:3], shard[3], topk, mode="allgather")
    pending = start_index_key_gather(shard[2], shard[3])
    prefetched = distributed_indexer_topk(*shard[:3], shard[3], topk, mode="allgather", prefetched_keys=pending)
    errors = {}
    for name, kwargs in {
        "ring": dict(mode="ring", prefetched_keys=start_index_key_gather(shard[2], shard[3])),
        "other keys": dict(mode="allgather", prefetched_keys=start_index_key_gather(shard[2].clone(), shard[3])),
    }.items():
        try:
            distributed_indexer_topk(*shard[:3], shard[3], topk, **kwargs)
        except ValueError as err:
            errors[name] = str(err)
    dist.barrier()  # the started-but-unused gathers above completed on every rank
    return {"inline": inline, "prefetched": prefetched, "errors": errors}


@pytest.mark.timeout(120)
def test_prefetched_index_keys_give_the_inline_topk():
    print(f"seed {SEED}")
    for r in run_distributed(_prefetch_worker, 2, timeout=100):
        assert torch.equal(r["prefetched"][1], r["inline"][1])
        torch.testing.assert_close(r["prefetched"][0], r["inline"][0], rtol=0, atol=0)
        assert "mode='allgather'" in r["errors"]["ring"]
        assert "start_index_key_gather(k_index_local" in r["errors"]["other keys"]


def _positions_worker(rank: int, world: int) -> str:
    from benchmarks.cp_scaling import _layer_cfg, make_layer_step, set_layout
    dims = set_layout(world)
    step, _ = make_layer_step(_layer_cfg(True, 64, "allgather"), dims, 64, True)
    real = dims.local_positions
    # Positions in plain order instead of this rank's zigzag chunks: the top-k would mask the wrong keys.
    dims_cls = type(dims)
    try:
        dims_cls.local_positions = lambda self, n, device=None: torch.arange(rank * n, (rank + 1) * n, device=device)
        step2, _ = make_layer_step(_layer_cfg(True, 64, "allgather"), dims, 64, True)
    finally:
        dims_cls.local_positions = real
    try:
        step2()
    except ValueError as err:
        return str(err)
    step()
    return "no error"


@pytest.mark.timeout(120)
def test_cp_layer_rejects_non_zigzag_positions():
    for msg in run_distributed(_positions_worker, 2, timeout=100):
        assert "dims.local_positions" in msg, msg


def _bytes_worker(rank: int, world: int, mode: str) -> dict:
    from benchmarks.cp_scaling import _layer_cfg, make_layer_step, set_layout
    from dsa_dist.parallel import _comm

    torch.manual_seed(SEED)
    dims = set_layout(world)
    cfg = _layer_cfg(True, 256, mode)
    step, _ = make_layer_step(cfg, dims, 256, True)
    with _comm.count_comm_bytes() as log:
        step()
    return {"sent": log.total, "kinds": sorted({kind for kind, _, _ in log.calls}), "cfg": cfg}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["allgather", "ring"])
def test_layer_sends_exactly_the_arithmetic_bytes(mode):
    """KV + FP8 keys + float KL keys forward, fp32 dKV + d keys backward — and nothing else (the key positions are
    no longer all-gathered: they are the zigzag default)."""
    from dsa_dist.parallel import cp_layer_comm_volume

    res = run_distributed(_bytes_worker, 2, mode, timeout=160)
    cfg = res[0]["cfg"]
    vol = cp_layer_comm_volume(256, 2, d_index=cfg.indexer.head_dim, index_heads=cfg.indexer.heads,
                               kv_dim=cfg.core_qk_dim, kv_dtype=torch.float32, topk=cfg.indexer.topk,
                               kl_key_dtype=torch.float32)
    expected = vol.kv_fwd + vol.dkv_bwd + vol.index_keys_fwd + vol.kl_keys_fwd + vol.dindex_keys_bwd
    for r in res:
        assert r["sent"] == expected, (r["sent"], expected, vol)
        assert r["kinds"] == (["all_gather", "reduce_scatter"] if mode == "allgather"
                              else ["all_gather", "p2p", "reduce_scatter"])
