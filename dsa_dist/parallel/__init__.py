"""Parallelism for DSA (docs/design.md §2): process groups, TP collectives, context-parallel sharding, index-key/KV
exchange, distributed top-k.

- :mod:`.groups` — :class:`ParallelDims`, :func:`init_parallel`, :func:`current_parallel_dims`,
  :func:`destroy_parallel`, :func:`validate_parallel_sizes` (Megatron's ``parallel_state`` owns the groups);
- :mod:`.tp` — the tensor-parallel moves of the DSA layer (:func:`sum_grad_over_tp`, :func:`rows_to_all`,
  :func:`heads_to_rows`, :func:`all_heads`);
- :mod:`.context_parallel` — the CP API (its ``__all__`` is the list), re-exported here unchanged.
"""

from dsa_dist.parallel import context_parallel as _api
from dsa_dist.parallel.context_parallel import *  # noqa: F403 - the API module's __all__ is the single list
from dsa_dist.parallel.groups import (
    ParallelDims,
    current_parallel_dims,
    destroy_parallel,
    init_parallel,
    validate_parallel_sizes,
)
from dsa_dist.parallel.tp import all_heads, heads_to_rows, rows_to_all, sum_grad_over_tp

__all__ = [
    *_api.__all__,
    "ParallelDims",
    "all_heads",
    "current_parallel_dims",
    "destroy_parallel",
    "heads_to_rows",
    "init_parallel",
    "rows_to_all",
    "sum_grad_over_tp",
    "validate_parallel_sizes",
]
