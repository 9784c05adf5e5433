"""Lightning indexer scores and causal top-k against naive float64 loops."""

import pytest
import torch

from dsa_dist.ops import (
    fp8_block_dequant,
    fp8_block_quant,
    lightning_indexer_scores,
    lightning_indexer_topk,
    prepare_indexer_qk,
    topk_from_scores,
)
from tests._inputs import integer_indexer_inputs


def _naive_scores(q, k, w, k_scale, q_pos, k_pos):
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    out = torch.full((b, lq, lk), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for t in range(lq):
            for s in range(lk):
                if k_pos[s] > q_pos[t]:
                    continue
                total = 0.0
                for hh in range(h):
                    total += float(w[bi, t, hh]) * max(float(q[bi, t, hh] @ k[bi, s]), 0.0)
                out[bi, t, s] = total * (1.0 if k_scale is None else float(k_scale[bi, s]))
    return out


def _inputs(b=2, lq=9, lk=9, h=3, d=8, dtype=torch.float64):
    return (
        torch.randn(b, lq, h, d, dtype=dtype),
        torch.randn(b, lk, d, dtype=dtype),
        torch.randn(b, lq, h, dtype=dtype),  # weights may be negative
    )


def test_scores_equal_naive_loops_with_positions_and_scale():
    q, k, w = _inputs(lq=5, lk=9)
    k_scale = torch.rand(2, 9, dtype=torch.float64) + 0.5
    q_pos = torch.tensor([2, 3, 6, 7, 8])  # a CP-style subset of query positions
    k_pos = torch.arange(9)
    got = lightning_indexer_scores(q, k, w, k_scale, q_positions=q_pos, k_positions=k_pos)
    torch.testing.assert_close(got, _naive_scores(q, k, w, k_scale, q_pos, k_pos))


def test_fp8_prepared_scores_equal_dequantised_math():
    q, k, w = _inputs(b=1, lq=12, lk=12, h=2, d=32, dtype=torch.float32)
    prep = prepare_indexer_qk(q, k, w, rope_dim=16, hadamard=True, fp8=True, ue8m0=True)
    assert prep.q_index.dtype == torch.float8_e4m3fn and prep.k_scale.shape == (1, 12)
    got = lightning_indexer_scores(prep.q_index, prep.k_index, prep.weights, prep.k_scale)
    # Independent path: rope+hadamard in float, quantise, dequantise, then the plain formula.
    plain = prepare_indexer_qk(q, k, w, rope_dim=16, hadamard=True, fp8=False)
    qq, qs = fp8_block_quant(plain.q_index, 32, ue8m0=True)
    kq, ks = fp8_block_quant(plain.k_index, 32, ue8m0=True)
    ref = _naive_scores(fp8_block_dequant(qq, qs, 32).double(), fp8_block_dequant(kq, ks, 32).double(),
                        w.double(), None, torch.arange(12), torch.arange(12))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # and FP8 scores stay close to the unquantised ones
    exact = lightning_indexer_scores(plain.q_index, plain.k_index, plain.weights)
    finite = torch.isfinite(exact)
    rel = (got[finite] - exact[finite]).norm() / exact[finite].norm()
    assert rel < 0.1


def _naive_topk(scores, k):
    """Python sort by (−score, index) per row; −inf entries invalid."""
    b, lq, lk = scores.shape
    idx = torch.full((b, lq, k), -1, dtype=torch.int32)
    for bi in range(b):
        for t in range(lq):
            valid = [(-float(scores[bi, t, s]), s) for s in range(lk) if scores[bi, t, s] != float("-inf")]
            for j, (_, s) in enumerate(sorted(valid)[:k]):
                idx[bi, t, j] = s
    return idx


@pytest.mark.parametrize("chunk", [1, 4, 512])
def test_topk_matches_naive_and_chunking_does_not_matter(chunk):
    q, k, w = _inputs(b=2, lq=20, lk=20, h=2, d=8, dtype=torch.float32)
    scores, idx = lightning_indexer_topk(q, k, w, 6, chunk_size=chunk)
    full = lightning_indexer_scores(q, k, w)
    assert torch.equal(idx, _naive_topk(full, 6))
    valid = idx >= 0
    # einsum's reduction order depends on the chunk shape: scores agree to rounding, indices exactly
    torch.testing.assert_close(scores[valid], full.gather(-1, idx.clamp_min(0).long())[valid], rtol=1e-6, atol=1e-6)
    assert torch.isneginf(scores[~valid]).all()


def test_short_rows_have_exactly_t_plus_1_valid_and_no_future():
    q, k, w = _inputs(b=1, lq=16, lk=16, h=2, d=8, dtype=torch.float32)
    _, idx = lightning_indexer_topk(q, k, w, 10, chunk_size=5)
    for t in range(16):
        row = idx[0, t]
        n_valid = int((row >= 0).sum())
        assert n_valid == min(t + 1, 10)
        assert (row[:n_valid] >= 0).all() and (row[n_valid:] == -1).all()  # invalid slots are the tail
        assert int(row.max()) <= t
        assert len(set(row[:n_valid].tolist())) == n_valid


def test_ties_pick_lowest_index():
    # All-zero query weights make every causal score exactly 0: the top-k must be 0..k-1.
    q, k, w = _inputs(b=1, lq=12, lk=12, h=2, d=4, dtype=torch.float32)
    _, idx = lightning_indexer_topk(q, k, torch.zeros_like(w), 4)
    for t in range(12):
        expect = list(range(min(t + 1, 4))) + [-1] * max(0, 4 - (t + 1))
        assert idx[0, t].tolist() == expect
    # Mixed: integer-valued scores with duplicates.
    scores = torch.tensor([[[3.0, 1.0, 3.0, 2.0, 3.0, float("-inf")]]])
    vals, idx = topk_from_scores(scores, 4)
    assert idx.tolist() == [[[0, 2, 4, 3]]] and vals.tolist() == [[[3.0, 3.0, 3.0, 2.0]]]


def test_integer_scores_with_many_ties_match_naive_sort():
    """Small-integer inputs: exact scores with many equal values, k_scale and negative weights included."""
    q, k, w, k_scale = integer_indexer_inputs(2, 24, 24, 3, 8)
    _, idx = lightning_indexer_topk(q, k, w, 7, k_scale, chunk_size=5)
    naive = _naive_scores(q, k, w, k_scale, torch.arange(24), torch.arange(24))
    assert torch.equal(idx, _naive_topk(naive, 7))


def test_candidate_merge_uses_global_index_ties():
    scores = torch.tensor([[5.0, 1.0, 5.0, 5.0, float("-inf")]])
    global_idx = torch.tensor([[40, 7, 12, 3, 2]])
    vals, idx = topk_from_scores(scores, 3, key_indices=global_idx)
    assert idx.tolist() == [[3, 12, 40]]
    vals, idx = topk_from_scores(scores, 6, key_indices=global_idx)
    assert idx.tolist() == [[3, 12, 40, 7, -1, -1]]
    scores2 = torch.tensor([[9.0, 9.0]])
    _, idx = topk_from_scores(scores2, 1, key_indices=torch.tensor([[5, -1]]))  # −1 = invalid candidate
    assert idx.tolist() == [[5]]
