"""Bytes moved by context parallelism (docs/design.md#context-parallelism): per-token sizes and per-layer volumes.

Used by docs/context_parallel.md and the benchmarks so the numbers quoted there are computed, not typed in.
Volumes are what **one rank receives** (all-gather, ring, all-to-all) or **sends** (reduce-scatter) for one DSA
layer; with the bandwidth-optimal algorithms NCCL uses, an all-gather or reduce-scatter of a T-byte tensor moves
``T · (CP − 1) / CP`` bytes through each rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP32_BYTES = 4


def index_key_bytes_per_token(d_index: int = 128, *, fp8: bool = True, key_dtype: torch.dtype = torch.bfloat16) -> int:
    """One index key: e4m3 ``d_I`` bytes + one fp32 scale (fp8), or ``d_I`` values of ``key_dtype``. 132 for V3.2."""
    return d_index + FP32_BYTES if fp8 else d_index * torch.empty((), dtype=key_dtype).element_size()


def kv_bytes_per_token(dim: int = 576, dtype: torch.dtype = torch.bfloat16) -> int:
    """Compact KV of one token: MLA latent 512 + rope 64 = 576 values (1152 B in bf16); GQA: 2·Hkv·d."""
    return dim * torch.empty((), dtype=dtype).element_size()


def candidate_bytes_per_query(topk: int = 2048) -> int:
    """Candidates one rank returns for one query: k × (fp32 score + int32 global index) = 8·k bytes."""
    return 8 * topk


def query_bytes_per_token(index_heads: int = 64, d_index: int = 128) -> int:
    """Indexer query of one token for the training ``candidates`` mode: e4m3 H_I·d_I + fp32 weights + int64 pos."""
    return index_heads * d_index + FP32_BYTES * index_heads + 8


@dataclass(frozen=True)
class LayerCommVolume:
    """Bytes through one rank for one DSA layer (see :func:`cp_layer_comm_volume`)."""

    index_keys_fwd: int  # FP8 index keys for the top-k (all-gather or ring; same bytes)
    kv_fwd: int  # compact KV all-gather
    kl_keys_fwd: int  # float index keys gathered for the KL loss (0 when not training the indexer)
    dkv_bwd: int  # fp32 dKV reduce-scatter
    dindex_keys_bwd: int  # fp32 d(index keys) reduce-scatter (0 when no KL)
    candidates_mode_fwd: int  # training "candidates" mode instead of index_keys_fwd: queries + candidates

    @property
    def forward(self) -> int:
        return self.index_keys_fwd + self.kv_fwd + self.kl_keys_fwd

    @property
    def backward(self) -> int:
        return self.dkv_bwd + self.dindex_keys_bwd


def cp_layer_comm_volume(
    seq_len: int,
    cp_size: int,
    *,
    d_index: int = 128,
    index_heads: int = 64,
    kv_dim: int = 576,
    kv_dtype: torch.dtype = torch.bfloat16,
    topk: int = 2048,
    kl_key_dtype: torch.dtype | None = torch.bfloat16,
) -> LayerCommVolume:
    """Per-rank communication of one DSA layer with the sequence zigzag-sharded over ``cp_size`` ranks.

    ``kl_key_dtype=None`` drops the indexer-KL terms (inference, or a frozen indexer).
    """
    remote = seq_len * (cp_size - 1) // cp_size  # tokens held by the other ranks
    kl_key = 0 if kl_key_dtype is None else index_key_bytes_per_token(d_index, fp8=False, key_dtype=kl_key_dtype)
    local = seq_len // cp_size
    return LayerCommVolume(
        index_keys_fwd=remote * index_key_bytes_per_token(d_index),
        kv_fwd=remote * kv_bytes_per_token(kv_dim, kv_dtype),
        kl_keys_fwd=remote * kl_key,
        dkv_bwd=remote * kv_dim * FP32_BYTES,
        dindex_keys_bwd=0 if kl_key_dtype is None else remote * d_index * FP32_BYTES,
        # gather the other ranks' queries, then receive k candidates for each local query from every other rank
        candidates_mode_fwd=remote * query_bytes_per_token(index_heads, d_index)
        + local * (cp_size - 1) * candidate_bytes_per_query(topk),
    )
