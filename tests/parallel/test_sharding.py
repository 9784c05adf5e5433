"""Zigzag sharding, CP config errors and byte accounting (single process; multi-rank checks live beside)."""

import pytest
import torch

from dsa_dist.parallel.context_parallel import (
    all_gather_sequence,
    candidate_bytes_per_query,
    check_cp_config,
    cp_layer_comm_volume,
    global_to_rank_major,
    index_key_bytes_per_token,
    kv_bytes_per_token,
    rank_major_to_global,
    zigzag_positions,
    zigzag_split,
)


def _megatron_style_positions(seq_len, cp, r):
    # Written out from the convention (2·CP chunks, rank r holds r and 2CP−1−r), by plain Python lists.
    chunk = seq_len // (2 * cp)
    return [*range(r * chunk, (r + 1) * chunk), *range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk)]


@pytest.mark.parametrize("seq_len,cp", [(8, 1), (7, 1), (8, 2), (24, 3), (32, 4), (64, 8)])
def test_zigzag_positions_follow_the_convention_and_partition_the_sequence(seq_len, cp):
    seen = []
    for r in range(cp):
        pos = zigzag_positions(seq_len, cp, r)
        assert pos.dtype == torch.int64 and pos.shape == (seq_len // cp,)
        assert pos.tolist() == (_megatron_style_positions(seq_len, cp, r) if cp > 1 else list(range(seq_len)))
        assert bool((pos[1:] > pos[:-1]).all())  # ascending: local tie-break order == global order
        seen += pos.tolist()
    assert sorted(seen) == list(range(seq_len))


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("seq_dim", [0, 1, -1])
def test_zigzag_split_matches_positions_and_round_trips(cp, seq_dim):
    x = torch.randn(16, 16, 16)
    shards = [zigzag_split(x, seq_dim, cp, r) for r in range(cp)]
    for r, shard in enumerate(shards):
        torch.testing.assert_close(shard, x.index_select(seq_dim, zigzag_positions(16, cp, r)), rtol=0, atol=0)
    rank_major = torch.cat(shards, seq_dim)
    torch.testing.assert_close(rank_major_to_global(rank_major, seq_dim, cp), x, rtol=0, atol=0)
    torch.testing.assert_close(global_to_rank_major(x, seq_dim, cp), rank_major, rtol=0, atol=0)


def test_zigzag_split_is_differentiable():
    x = torch.randn(2, 8, requires_grad=True)
    zigzag_split(x, 1, 2, 1).sum().backward()
    assert x.grad[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("seq_len,cp", [(10, 4), (9, 2), (6, 2)])
def test_check_cp_config_names_the_problem_and_the_fix(seq_len, cp):
    with pytest.raises(ValueError) as err:
        check_cp_config(seq_len, cp)
    msg = str(err.value)
    padded = -(-seq_len // (2 * cp)) * 2 * cp
    assert f"seq_len={seq_len}" in msg and f"2*cp={2 * cp}" in msg and f"pad the sequence to {padded}" in msg
    with pytest.raises(ValueError, match="seq_len"):
        zigzag_split(torch.zeros(seq_len), 0, cp, 0)


def test_check_cp_config_rejects_bad_values():
    check_cp_config(12, 3)
    for bad_cp in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="cp_size"):
            check_cp_config(16, bad_cp)
    with pytest.raises(ValueError, match="seq_len"):
        check_cp_config(0, 2)
    with pytest.raises(ValueError, match="cp_rank"):
        zigzag_positions(16, 2, 2)


def test_single_process_gather_is_identity():
    # No process group initialised: CP = 1, nothing to move.
    x = torch.randn(2, 6, 3, requires_grad=True)
    assert all_gather_sequence(x, 1) is x
    pending = all_gather_sequence(x, 1, async_op=True)
    y = pending.wait()
    torch.testing.assert_close(y, x)
    (y * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_bytes_per_token_and_layer_volume_arithmetic():
    assert index_key_bytes_per_token(128) == 132
    assert index_key_bytes_per_token(128, fp8=False) == 256
    assert kv_bytes_per_token(576, torch.bfloat16) == 1152
    assert candidate_bytes_per_query(2048) == 16384
    v = cp_layer_comm_volume(131072, 8)
    remote = 131072 * 7 // 8  # tokens of the other 7 ranks
    assert v.index_keys_fwd == remote * 132
    assert v.kv_fwd == remote * 1152
    assert v.dkv_bwd == remote * 576 * 4
    assert v.forward == remote * (132 + 1152 + 256)
    assert v.backward == remote * (576 + 128) * 4
    assert cp_layer_comm_volume(1024, 1).forward == 0


def test_single_process_topk_paths_equal_the_reference():
    from dsa_dist.ops import lightning_indexer_topk
    from dsa_dist.parallel.context_parallel import TOPK_MODES, candidate_topk, distributed_indexer_topk

    q, k, w = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 8), torch.randn(1, 6, 2)
    ref = lightning_indexer_topk(q, k, w, 4)
    for mode in TOPK_MODES:
        got = distributed_indexer_topk(q, w, k, None, 4, mode=mode)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    pos = torch.arange(6)
    torch.testing.assert_close(candidate_topk(q, w, k, None, 4, q_positions=pos, k_positions_local=pos), ref,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode"):
        distributed_indexer_topk(q, w, k, None, 4, mode="bogus")
    with pytest.raises(ValueError, match="increasing"):
        candidate_topk(q, w, k, None, 4, q_positions=pos, k_positions_local=pos.flip(0))


@pytest.mark.parametrize("cp,seq_dim", [(1, 1), (2, 0), (4, 1)])
def test_reorder_and_cast_in_one_pass_equals_reorder_then_cast(cp, seq_dim):
    # the gather's backward reorders the full-length gradient and widens it to fp32 in one buffer
    from dsa_dist.parallel.sharding import _global_to_rank_major_as

    x = torch.randn(3, 8 * cp, 5).to(torch.bfloat16)
    x = x.transpose(0, 1).contiguous() if seq_dim == 0 else x
    got = _global_to_rank_major_as(x, seq_dim, cp, torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, global_to_rank_major(x, seq_dim, cp).float())
