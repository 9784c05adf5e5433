"""Triton kernels for DSA, one family per module, each with the same signature as its reference op in
:mod:`dsa_dist.ops`: ``fp8_quant``, ``indexer_topk`` (its exact selection in ``topk_select``),
``sparse_attention``, ``indexer_kl``, ``sparse_attention_kl`` (sparse attention with the indexer KL fused into
its backward).

This package depends on torch and triton only and makes no backend decision: a wrapper checks its inputs and
launches, on CUDA tensors (or CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``), and raises
otherwise. Which implementation runs is decided in one place, :mod:`dsa_dist.ops.dispatch`."""
