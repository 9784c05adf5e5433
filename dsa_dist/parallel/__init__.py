"""Parallelism for DSA (DESIGN.md §2): context-parallel sharding, index-key/KV exchange, distributed top-k.

The public CP API lives in :mod:`dsa_dist.parallel.context_parallel`.
"""
