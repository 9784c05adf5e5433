"""Op dispatch: reference on CPU, kernels on CUDA, and the DSA_BACKEND override."""

import pytest
import torch

from dsa_dist.ops import dispatch, kl, sparse_attention, topk


def test_cpu_tensors_use_the_reference(monkeypatch):
    monkeypatch.delenv("DSA_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert dispatch.resolve("sparse_attention", cpu) is sparse_attention
    assert dispatch.resolve("lightning_indexer_topk", cpu) is topk.lightning_indexer_topk
    assert dispatch.resolve("indexer_kl_loss_sparse", cpu) is kl.indexer_kl_loss_sparse


def test_dispatched_call_matches_reference():
    q, k, v = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4)
    idx = torch.zeros(1, 8, 3, dtype=torch.int32)
    got = dispatch.sparse_attention(q, k, v, idx)
    want = sparse_attention(q, k, v, idx)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_backend_override(monkeypatch):
    monkeypatch.setenv("DSA_BACKEND", "reference")
    assert dispatch.resolve("sparse_attention", torch.device("cuda")) is sparse_attention
    monkeypatch.setenv("DSA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DSA_BACKEND must be"):
        dispatch.resolve("sparse_attention", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_use_kernels(monkeypatch):
    monkeypatch.delenv("DSA_BACKEND", raising=False)
    from kernels import sparse_attention as kernel_module

    assert dispatch.resolve("sparse_attention", torch.device("cuda")) is kernel_module.sparse_attention
