"""Query positions as contiguous runs of global positions — the static form of ``q_positions``.

A rank's queries are one run (CP=1: ``[0, L)``) or two (zigzag CP: chunks ``r`` and ``2·CP−1−r``, see
:mod:`dsa_dist.parallel.sharding`). Written as Python ``(start, length)`` pairs, the layout is known on the host
without reading a device tensor, so the fused dense attention (:mod:`dsa_dist.ops.fused_dense`) can slice its keys
per run with no host synchronisation; the reference op turns the same pairs back into a positions tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PositionBlocks = tuple[tuple[int, int], ...]
"""``((start, length), ...)``: queries at global positions ``start .. start+length-1``, run after run."""


def check_blocks(name: str, blocks: object, total: int) -> PositionBlocks:
    """Validate ``blocks`` (non-negative ``start``, positive ``length``, lengths summing to ``total``); normalise."""
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or not blocks:
        raise ValueError(f"{name} must be a non-empty sequence of (start, length) pairs, got {blocks!r}")
    out = []
    for i, pair in enumerate(blocks):
        ok = isinstance(pair, Sequence) and len(pair) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in pair)
        if not ok or pair[0] < 0 or pair[1] < 1:
            raise ValueError(f"{name}[{i}] must be a pair (start >= 0, length >= 1) of ints, got {pair!r}")
        out.append((int(pair[0]), int(pair[1])))
    if sum(n for _, n in out) != total:
        raise ValueError(f"{name} covers {sum(n for _, n in out)} queries but q has {total} (dim 1): the lengths "
                         "of the (start, length) runs must add up to the number of queries")
    return merge_adjacent(out)


def merge_adjacent(blocks: Sequence[tuple[int, int]]) -> PositionBlocks:
    """Join runs that continue one another (``start`` of the next = end of the previous)."""
    merged: list[tuple[int, int]] = []
    for start, length in blocks:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return tuple(merged)


def blocks_from_positions(positions: Sequence[int]) -> PositionBlocks:
    """The runs of consecutive ascending values in host-side ``positions`` (any int sequence, e.g. ``t.tolist()``)."""
    return merge_adjacent([(int(p), 1) for p in positions])


def positions_from_blocks(blocks: PositionBlocks, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 positions [sum of lengths] of ``blocks``, built on ``device`` from ``arange`` (no host-to-device copy)."""
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in blocks])
