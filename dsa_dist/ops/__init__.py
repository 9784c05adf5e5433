"""Reference DSA ops in plain PyTorch: the ground truth for every kernel and every distributed path.

Device-agnostic and differentiable. Layout is batch-first ``[B, L, heads, dim]``; top-k indices are int32
rows of the key tensor with −1 for an empty slot.
"""

from dsa_dist.ops._checks import set_debug_checks
from dsa_dist.ops.dense_attention import dense_attention
from dsa_dist.ops.fp8 import fp8_block_dequant, fp8_block_quant, fp8_fake_quant
from dsa_dist.ops.indexer import (
    IndexerInputs,
    indexer_flops,
    lightning_indexer_scores,
    prepare_indexer_k,
    prepare_indexer_q,
    prepare_indexer_qk,
)
from dsa_dist.ops.kl import indexer_kl_loss_dense, indexer_kl_loss_sparse
from dsa_dist.ops.rotary import apply_rope, hadamard_transform
from dsa_dist.ops.sparse_attention import gather_rows, sparse_attention, sparse_attention_flops
from dsa_dist.ops.sparse_attention_kl import sparse_attention_with_indexer_kl
from dsa_dist.ops.topk import INVALID_INDEX, lightning_indexer_topk, topk_from_scores

__all__ = [
    "INVALID_INDEX",
    "IndexerInputs",
    "apply_rope",
    "dense_attention",
    "fp8_block_dequant",
    "fp8_block_quant",
    "fp8_fake_quant",
    "gather_rows",
    "hadamard_transform",
    "indexer_flops",
    "indexer_kl_loss_dense",
    "indexer_kl_loss_sparse",
    "lightning_indexer_scores",
    "lightning_indexer_topk",
    "prepare_indexer_k",
    "prepare_indexer_q",
    "prepare_indexer_qk",
    "set_debug_checks",
    "sparse_attention",
    "sparse_attention_flops",
    "sparse_attention_with_indexer_kl",
    "topk_from_scores",
]
