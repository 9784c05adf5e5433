"""Collective helpers shared by the context-parallel primitives (DESIGN.md §2, CP).

Everything here works on any ``torch.distributed`` process group: NCCL on GPUs, gloo on CPU tests. The only
backend differences are hidden in this file:

- FP8 tensors travel as ``uint8`` views (gloo has no float8 dtypes; the bytes are what we want to move anyway);
- reduce-scatter uses ``reduce_scatter_tensor`` where the backend has it and otherwise an ``all_reduce`` of the
  stacked tensor followed by taking this rank's slice — one helper, the same sum either way;
- ``dist`` not initialised, or a group of one rank, means "no communication": every helper degrades to a copy.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from dsa_dist.ops._checks import FP8_DTYPES

ReduceScatterMethod = Literal["auto", "reduce_scatter", "all_reduce"]

# torch >= 2.13 renames all_gather_into_tensor / reduce_scatter_tensor; older torch (the GPU image) has only
# the old names. Pick whichever exists so neither warns.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# backend name -> whether its reduce-scatter works (probed once; gloo gained it only in recent torch).
_REDUCE_SCATTER_OK: dict[str, bool] = {}


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(size, rank)`` of ``group`` (default: world); ``(1, 0)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Global rank of ``group_rank`` inside ``group`` (P2P ops address peers by global rank)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def to_wire(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor every backend can move: FP8 is reinterpreted as uint8 (same bytes, no copy)."""
    x = x.contiguous()
    return x.view(torch.uint8) if x.dtype in FP8_DTYPES else x


def all_gather_stacked(
    x: torch.Tensor, group: dist.ProcessGroup | None, *, async_op: bool = False
) -> tuple[torch.Tensor, dist.Work | None]:
    """All-gather ``x`` into ``[size, *x.shape]`` (rank-major), keeping x's dtype (FP8 included).

    With ``async_op`` the returned work handle must be waited on before the output is read.
    """
    size, _ = group_size_rank(group)
    wire = to_wire(x)
    if wire.dim() == 0:
        wire = wire.reshape(1)
    # gloo wants the output as [size · n, ...] (concatenated along dim 0); view it as [size, n, ...] afterwards.
    flat = torch.empty((size * wire.shape[0], *wire.shape[1:]), dtype=wire.dtype, device=wire.device)
    if size == 1:
        flat.copy_(wire)
        work = None
    else:
        work = _all_gather_into(flat, wire, group=group, async_op=async_op)
    out = flat.view(size, *x.shape)
    return (out.view(x.dtype) if x.dtype in FP8_DTYPES else out), work


def _reduce_scatter_supported(backend: str) -> bool:
    return _REDUCE_SCATTER_OK.get(backend, True)


def reduce_scatter_stacked(
    x: torch.Tensor, group: dist.ProcessGroup | None, *, method: ReduceScatterMethod = "auto"
) -> torch.Tensor:
    """Sum ``x`` [size, *S] over the ranks of ``group`` and return this rank's slice [*S].

    ``method="auto"`` uses the backend's reduce-scatter when it has one (NCCL; gloo in recent torch) and
    falls back to ``all_reduce`` + slice otherwise; both give the same sum. Call it with fp32 (the CP backward
    accumulates gradients in fp32 and casts back afterwards).
    """
    size, rank = group_size_rank(group)
    if x.shape[0] != size:
        raise ValueError(f"reduce_scatter_stacked expects dim 0 == group size {size}, got shape {tuple(x.shape)}")
    if size == 1:
        return x[0].clone()
    x = x.contiguous()
    backend = str(dist.get_backend(group))
    if method == "auto":
        method = "reduce_scatter" if _reduce_scatter_supported(backend) else "all_reduce"
    if method == "reduce_scatter":
        # gloo wants the input concatenated along dim 0: [size · n, ...] -> [n, ...]
        rows = x.reshape(size, -1) if x.dim() == 1 else x
        flat_in = rows.reshape(size * rows.shape[1], *rows.shape[2:])
        out = torch.empty(rows.shape[1:], dtype=x.dtype, device=x.device)
        try:
            _reduce_scatter_into(out, flat_in, group=group)
            return out.view(x.shape[1:])
        except RuntimeError as err:
            # A backend without reduce-scatter refuses locally, before any byte moves, on every rank alike,
            # so falling back here cannot desynchronise the group.
            if "not supported" not in str(err).lower() and "unsupported" not in str(err).lower():
                raise
            _REDUCE_SCATTER_OK[backend] = False
    elif method != "all_reduce":
        raise ValueError(f"method must be 'auto', 'reduce_scatter' or 'all_reduce', got {method!r}")
    total = x.clone()
    dist.all_reduce(total, group=group)
    return total[rank]


def all_to_all_stacked(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``x`` [size, *S]: slice j goes to rank j; returns [size, *S] where slice j came from rank j."""
    size, _ = group_size_rank(group)
    if x.shape[0] != size:
        raise ValueError(f"all_to_all_stacked expects dim 0 == group size {size}, got shape {tuple(x.shape)}")
    wire = to_wire(x)
    if size == 1:
        return x.clone()
    out = torch.empty_like(wire)
    dist.all_to_all_single(out, wire, group=group)
    return out.view(x.dtype) if x.dtype in FP8_DTYPES else out
