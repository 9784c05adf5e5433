"""Parallelism for DSA (DESIGN.md §2): context-parallel sharding, index-key/KV exchange, distributed top-k.

The public CP API is defined in :mod:`dsa_dist.parallel.context_parallel` (its ``__all__`` is the list) and
re-exported here unchanged.
"""

from dsa_dist.parallel import context_parallel as _api
from dsa_dist.parallel.context_parallel import *  # noqa: F403 - the API module's __all__ is the single list

__all__ = list(_api.__all__)
