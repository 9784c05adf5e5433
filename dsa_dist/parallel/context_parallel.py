"""Context parallelism for DSA (docs/design.md#context-parallelism): the public API the Megatron model calls.

Pure functions over a ``torch.distributed`` process group (the model passes
``parallel_state.get_context_parallel_group()``; tests pass gloo groups). Data flow of one DSA layer on CP
rank r (details and byte counts: docs/context_parallel.md):

1. the batch is zigzag-sharded (:func:`zigzag_split`, :func:`zigzag_positions`; :func:`check_cp_config`);
2. the rank quantises its index keys to FP8 and :func:`distributed_indexer_topk` returns the exact global top-k
   of its own queries (keys by all-gather or ring, or candidates by all-to-all); the all-gather can be started
   early (:func:`start_index_key_gather`) and handed over as ``prefetched_keys``;
3. the compact KV is gathered with :func:`all_gather_sequence` (``async_op=True`` overlaps it with step 2);
   sparse attention runs on local queries against the gathered KV with the global indices;
4. the KL loss uses float index keys gathered with :func:`all_gather_sequence`; in backward, dKV and
   d(index keys) are reduce-scattered (fp32) to the ranks that own them (``defer_backward=True``: waited for
   where the gradient is consumed, so the transfer overlaps the rest of the backward).

:func:`candidate_topk` is the decode-time form over a sequence-sharded KV cache.
"""

from dsa_dist.parallel.comm_volume import (
    LayerCommVolume,
    candidate_bytes_per_query,
    cp_layer_comm_volume,
    index_key_bytes_per_token,
    kv_bytes_per_token,
    query_bytes_per_token,
)
from dsa_dist.parallel.distributed_topk import (
    TOPK_MODES,
    PendingIndexKeys,
    TopkMode,
    candidate_topk,
    distributed_indexer_topk,
    start_index_key_gather,
)
from dsa_dist.parallel.sharding import (
    PendingSequenceGather,
    all_gather_sequence,
    check_cp_config,
    global_to_rank_major,
    rank_major_to_global,
    zigzag_positions,
    zigzag_split,
)

__all__ = [
    "TOPK_MODES",
    "LayerCommVolume",
    "PendingIndexKeys",
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
    "start_index_key_gather",
    "zigzag_positions",
    "zigzag_split",
]
