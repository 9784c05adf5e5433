"""Op dispatch: the one backend decision (reference on CPU, kernels on CUDA, DSA_BACKEND), never a silent switch."""

import logging
import sys

import pytest
import torch

from dsa_dist.ops import dispatch, fp8, kl, sparse_attention, topk

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


def test_cpu_tensors_use_the_reference(monkeypatch):
    monkeypatch.delenv("DSA_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert dispatch.resolve("sparse_attention", cpu) is sparse_attention
    assert dispatch.resolve("lightning_indexer_topk", cpu) is topk.lightning_indexer_topk
    assert dispatch.resolve("fp8_block_quant", cpu) is fp8.fp8_block_quant
    assert dispatch.resolve("indexer_kl_loss_dense", cpu) is kl.indexer_kl_loss_dense
    assert dispatch.resolve("indexer_kl_loss_sparse", cpu) is kl.indexer_kl_loss_sparse


def test_reference_on_cuda_is_logged_once_and_counted(monkeypatch, caplog):
    monkeypatch.setenv("DSA_BACKEND", "reference")
    monkeypatch.setattr(dispatch, "_reference_on_cuda", type(dispatch._reference_on_cuda)())
    with caplog.at_level(logging.WARNING, logger="dsa_dist.ops.dispatch"):
        for _ in range(3):
            assert dispatch.resolve("sparse_attention", CUDA) is sparse_attention
        assert dispatch.resolve("fp8_block_quant", CUDA) is fp8.fp8_block_quant
        dispatch.resolve("sparse_attention", "cpu")  # the reference on CPU is no fallback: not counted
    assert dispatch.reference_fallbacks() == {"sparse_attention": 3, "fp8_block_quant": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "sparse_attention" in warnings[0] and "DSA_BACKEND=reference" in warnings[0]


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("DSA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DSA_BACKEND must be 'auto', 'reference' or 'triton', got 'fastest'"):
        dispatch.resolve("sparse_attention", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown op 'dense'"):
        dispatch.resolve("dense", torch.device("cpu"), backend="auto")


def test_missing_kernel_on_cuda_is_an_error(monkeypatch):
    """No quiet switch to the reference op: an unimportable kernel fails the call and says what to do."""
    monkeypatch.delenv("DSA_BACKEND", raising=False)
    monkeypatch.setitem(sys.modules, "kernels.sparse_attention", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match=r"needs the Triton kernel kernels\.sparse_attention.*DSA_BACKEND=reference"):
        dispatch.resolve("sparse_attention", CUDA)
    monkeypatch.setenv("DSA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        dispatch.resolve("sparse_attention", CUDA)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("DSA_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("fp8_block_quant", torch.device("cpu"))


@pytest.mark.parametrize("op", ["indexer_kl_loss_dense", "indexer_kl_loss_sparse"])
def test_kl_needs_the_attention_lse_on_every_backend(op):
    q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 1, 8)
    qi, ki, w = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 8), torch.randn(1, 6, 2)
    extra = (torch.zeros(1, 6, 3, dtype=torch.int32),) if op.endswith("sparse") else ()
    with pytest.raises(ValueError, match=r"needs attn_lse=\[B, Lq, H\].*the attention returns"):
        getattr(dispatch, op)(q, k, qi, ki, w, *extra)


@pytest.mark.gpu
def test_cuda_tensors_use_kernels(monkeypatch):
    monkeypatch.delenv("DSA_BACKEND", raising=False)
    from kernels import fp8_quant, indexer_kl, indexer_topk
    from kernels import sparse_attention as kernel_module

    assert dispatch.resolve("sparse_attention", CUDA) is kernel_module.sparse_attention
    assert dispatch.resolve("lightning_indexer_topk", CUDA) is indexer_topk.lightning_indexer_topk
    assert dispatch.resolve("fp8_block_quant", CUDA) is fp8_quant.fp8_block_quant
    assert dispatch.resolve("indexer_kl_loss_sparse", CUDA) is indexer_kl.indexer_kl_loss_sparse
