"""Triton kernels for DSA, one family per module, each with the same signature as its reference op in
:mod:`dsa_dist.ops` (which :mod:`dsa_dist.ops.dispatch` routes CUDA tensors to): ``fp8_quant``,
``indexer_topk``, ``sparse_attention``, ``indexer_kl``."""
