"""Parallelism for DSA (DESIGN.md §2): context-parallel sharding, index-key/KV exchange, distributed top-k.

The public CP API is defined in :mod:`dsa_dist.parallel.context_parallel` and re-exported here.
"""

from dsa_dist.parallel.context_parallel import (
    TOPK_MODES,
    LayerCommVolume,
    PendingSequenceGather,
    TopkMode,
    all_gather_sequence,
    candidate_bytes_per_query,
    candidate_topk,
    check_cp_config,
    cp_layer_comm_volume,
    distributed_indexer_topk,
    global_to_rank_major,
    index_key_bytes_per_token,
    kv_bytes_per_token,
    query_bytes_per_token,
    rank_major_to_global,
    zigzag_positions,
    zigzag_split,
)

__all__ = [
    "TOPK_MODES",
    "LayerCommVolume",
    "PendingSequenceGather",
    "TopkMode",
    "all_gather_sequence",
    "candidate_bytes_per_query",
    "candidate_topk",
    "check_cp_config",
    "cp_layer_comm_volume",
    "distributed_indexer_topk",
    "global_to_rank_major",
    "index_key_bytes_per_token",
    "kv_bytes_per_token",
    "query_bytes_per_token",
    "rank_major_to_global",
    "zigzag_positions",
    "zigzag_split",
]
