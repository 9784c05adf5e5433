"""The benchmark instrumentation of dsa_dist.parallel._comm on 2 real gloo ranks: the byte counter matches
``cp_layer_comm_volume``'s arithmetic for a CP layer's exchanges, and ``local_only`` moves nothing while keeping
every shape (benchmarks/cp_scaling.py relies on both)."""

import torch
import torch.distributed as dist

from dsa_dist.parallel import _comm
from dsa_dist.parallel.context_parallel import (
    all_gather_sequence,
    cp_layer_comm_volume,
    distributed_indexer_topk,
    zigzag_split,
)
from tests._dist import run_distributed


def _worker(rank: int, ws: int) -> dict:
    torch.manual_seed(3)
    L, d_i, h_i, kv_dim, topk = 16, 8, 2, 12, 4
    kv_full = torch.randn(1, L, kv_dim, dtype=torch.bfloat16)
    q = torch.randn(1, L, h_i, d_i).to(torch.float8_e4m3fn)
    k = torch.randn(1, L, d_i).to(torch.float8_e4m3fn)
    w, s = torch.randn(1, L, h_i), torch.rand(1, L) + 0.5
    shard = lambda x: zigzag_split(x, 1, ws, rank)  # noqa: E731

    with _comm.count_comm_bytes() as log:
        kv = shard(kv_full).clone().requires_grad_(True)
        gathered = all_gather_sequence(kv, 1)  # KV forward; backward: fp32 reduce-scatter of dKV
        gathered.float().sum().backward()
        ring_idx = distributed_indexer_topk(shard(q), shard(w), shard(k), shard(s), topk, mode="ring")[1]
    vol = cp_layer_comm_volume(L, ws, d_index=d_i, index_heads=h_i, kv_dim=kv_dim, topk=topk, kl_key_dtype=None)
    sent = dict(log.sent)
    assert sent["all_gather"] == vol.kv_fwd, (sent, vol)
    assert sent["reduce_scatter"] == vol.dkv_bwd, (sent, vol)
    assert sent["p2p"] == vol.index_keys_fwd, (sent, vol)
    assert log.total == vol.kv_fwd + vol.dkv_bwd + vol.index_keys_fwd
    assert [c[0] for c in log.calls] == ["all_gather", "reduce_scatter"] + ["p2p"] * (ws - 1)

    # local_only: no collective runs (a rank-dependent shard comes back replicated, not gathered), same shapes,
    # nothing counted; the ring still runs every step on the local shard.
    with _comm.count_comm_bytes() as quiet, _comm.local_only():
        local = shard(kv_full)
        fake = all_gather_sequence(local, 1)
        idx = distributed_indexer_topk(shard(q), shard(w), shard(k), shard(s), topk, mode="ring")[1]
    assert quiet.total == 0 and not quiet.calls
    assert fake.shape == kv_full.shape and idx.shape == ring_idx.shape
    assert torch.equal(fake[:, : L // (2 * ws)], local[:, : L // (2 * ws)])  # chunk 0 is this rank's first chunk
    dist.barrier()
    return {"fake_first": fake[:, : L // (2 * ws)], "idx": idx}


def test_byte_counter_matches_arithmetic_and_local_only_moves_nothing():
    results = run_distributed(_worker, 2)
    # Under local_only rank 1's "gathered" first chunk is its own data, not rank 0's: nothing was exchanged.
    assert not torch.equal(results[0]["fake_first"], results[1]["fake_first"])
