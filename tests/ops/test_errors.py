"""Bad input to the public ops raises a clear error naming the argument."""

import pytest
import torch

from dsa_dist.ops import (
    dense_attention,
    fp8_block_quant,
    indexer_kl_loss_dense,
    lightning_indexer_scores,
    lightning_indexer_topk,
    set_debug_checks,
    sparse_attention,
)


def _attn(b=1, L=8, h=4, hkv=1, d=8, dv=8, k=4):
    return (torch.randn(b, L, h, d), torch.randn(b, L, hkv, d), torch.randn(b, L, hkv, dv),
            torch.zeros(b, L, k, dtype=torch.int32))


def _index(b=1, L=8, hi=2, di=8):
    return torch.randn(b, L, hi, di), torch.randn(b, L, di), torch.randn(b, L, hi)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: (a[0][..., :4], *a[1:]), ValueError, r"k has shape .*d_qk, as in q"),
        (lambda a: (a[0], a[1], a[2][:, :5], a[3]), ValueError, "v must be"),
        (lambda a: (a[0][:, :, :3], a[1].expand(-1, -1, 2, -1), a[2].expand(-1, -1, 2, -1), a[3]),
         ValueError, r"q heads \(3\) must be a multiple"),
        (lambda a: (*a[:3], a[3][:, :5]), ValueError, "topk_indices must be"),
        (lambda a: (*a[:3], a[3].float()), TypeError, "topk_indices must have dtype"),
        (lambda a: (a[0].to(torch.int64), *a[1:]), TypeError, "q must have dtype"),
        (lambda a: (a[0][0], *a[1:]), ValueError, "q must have 4 dims"),
        (lambda a: (a[0], a[1].to("meta"), *a[2:]), ValueError, "one device"),
        (lambda a: ("not a tensor", *a[1:]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_sparse_attention_bad_input(mutate, exc, match):
    with pytest.raises(exc, match=match):
        sparse_attention(*mutate(_attn()))


@pytest.mark.parametrize("topk", [0, -3, 2.5, True])
def test_topk_must_be_positive_int(topk):
    with pytest.raises(ValueError, match="topk must be a positive int"):
        lightning_indexer_topk(*_index(), topk)


def test_indexer_shape_errors():
    qi, ki, w = _index()
    with pytest.raises(ValueError, match=r"k_index .*d_I, as in q_index"):
        lightning_indexer_scores(qi, ki[..., :4], w)
    with pytest.raises(ValueError, match=r"weights .*indexer heads"):
        lightning_indexer_scores(qi, ki, w[..., :1])
    with pytest.raises(ValueError, match="k_scale must have shape"):
        lightning_indexer_scores(qi, ki, w, torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"q_positions must have shape \[8\]"):
        lightning_indexer_topk(qi, ki, w, 4, q_positions=torch.arange(5))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        lightning_indexer_topk(qi, ki, w, 4, chunk_size=0)


def test_fp8_and_kl_errors():
    with pytest.raises(ValueError, match="multiple of block_size=128"):
        fp8_block_quant(torch.randn(4, 100))
    with pytest.raises(TypeError, match="x must have dtype"):
        fp8_block_quant(torch.ones(4, 128, dtype=torch.int32))
    q, k, _, _ = _attn()
    with pytest.raises(ValueError, match=r"attn_lse must be \[B, Lq, H\]"):
        indexer_kl_loss_dense(q, k, *_index(), attn_lse=torch.zeros(1, 8, 3))
    with pytest.raises(ValueError, match="reduction must be"):
        indexer_kl_loss_dense(q, k, *_index(), reduction="avg")


def test_nan_inputs_rejected_only_with_debug_checks():
    q, k, v, idx = _attn()
    q[0, 0, 0, 0] = float("nan")
    sparse_attention(q, k, v, idx)  # debug checks off: no device sync, no scan
    set_debug_checks(True)
    try:
        with pytest.raises(ValueError, match="q contains NaN or inf"):
            sparse_attention(q, k, v, idx)
        with pytest.raises(ValueError, match="k contains NaN or inf"):
            dense_attention(q.nan_to_num(), k.masked_fill(torch.ones_like(k, dtype=torch.bool), float("inf")), v)
    finally:
        set_debug_checks(False)


@pytest.mark.parametrize("entry", ["reference", "dispatch"])
@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_kl_batch_mismatch_names_both_shapes(entry, variant):
    """q with batch 1, indexer inputs with batch 2: once silently scored against batch 0 of q; now refused."""
    from dsa_dist.ops import dispatch, indexer_kl_loss_sparse

    q, k, _, idx = _attn(b=1, h=2, d=8)
    qi, ki, w = _index(b=2, hi=2, di=8)
    lse = torch.zeros(1, 8, 2)
    fn = {("reference", "dense"): indexer_kl_loss_dense, ("reference", "sparse"): indexer_kl_loss_sparse,
          ("dispatch", "dense"): dispatch.indexer_kl_loss_dense,
          ("dispatch", "sparse"): dispatch.indexer_kl_loss_sparse}[entry, variant]
    extra = (idx,) if variant == "sparse" else ()
    with pytest.raises(ValueError, match=r"q_index has batch size 2 \(shape \(2, 8, 2, 8\)\) but q has 1 "
                                         r"\(shape \(1, 8, 2, 8\)\)"):
        fn(q, k, qi, ki, w, *extra, attn_lse=lse)


@pytest.mark.parametrize("entry", ["reference", "dispatch"])
@pytest.mark.parametrize("bad,match", [(8, r"max index 8 with L = 8 keys"), (10**9, r"max index 1000000000 with L = 8"),
                                       (-2, r"got min -2")])
def test_sparse_attention_index_out_of_range(entry, bad, match):
    """Indices ≥ L (or < −1) would gather past the keys (garbage, or a crash): refused with the max and L."""
    from dsa_dist.ops import dispatch

    q, k, v, idx = _attn()
    idx[0, 5, 2] = bad
    fn = sparse_attention if entry == "reference" else dispatch.sparse_attention
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, idx)


def test_sparse_kl_index_out_of_range():
    from dsa_dist.ops import indexer_kl_loss_sparse

    q, k, _, idx = _attn(h=2)
    idx[0, 7, 0] = 8
    with pytest.raises(ValueError, match=r"topk_indices must hold key rows in \[0, 8\).*max index 8"):
        indexer_kl_loss_sparse(q, k, *_index(), idx, attn_lse=torch.zeros(1, 8, 2))
