"""Collective helpers shared by the context-parallel primitives (docs/design.md#context-parallelism).

Everything here works on any ``torch.distributed`` process group: NCCL on GPUs, gloo on CPU tests. The only
backend differences are hidden in this file:

- FP8 tensors travel as ``uint8`` views (gloo has no float8 dtypes; the bytes are what we want to move anyway);
- reduce-scatter uses ``reduce_scatter_tensor`` where the backend has it and otherwise an ``all_reduce`` of the
  stacked tensor followed by taking this rank's slice — one helper, the same sum either way;
- ``dist`` not initialised, or a group of one rank, means "no communication": every helper degrades to a copy.

Instrumentation for benchmarks (benchmarks/cp_scaling.py), off by default and free when off:

- :func:`count_comm_bytes` records the bytes this rank *sends* through every CP collective issued here (all-gather,
  reduce-scatter, all-to-all, ring P2P), computed from the tensors actually passed — the measured counterpart of
  the arithmetic in :mod:`dsa_dist.parallel.comm_volume`;
- :func:`local_only` replaces every collective by a local copy of the same shape (no bytes move, results are
  not the CP results), so "time with the exchange" minus "time under local_only" is the communication that the
  compute does not hide.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
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

# Benchmark instrumentation (see the module docstring): the active byte counter, and the compute-alone switch.
_COUNTER: CommLog | None = None
_LOCAL_ONLY = False


@dataclass
class CommLog:
    """What :func:`count_comm_bytes` saw: bytes sent by kind, and every call as ``(kind, group, tensor bytes)``
    (the tensor a rank passes: the shard of an all-gather, the input of a reduce-scatter / all-to-all / all-reduce,
    the buffer of a P2P send) so a benchmark can replay the same collectives without the compute."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: list[tuple[str, object, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """All bytes this rank sent."""
        return sum(self.sent.values())


@contextlib.contextmanager
def count_comm_bytes() -> Iterator[CommLog]:
    """Log the bytes this rank sends through the collectives here, by kind (``"all_gather"``,
    ``"reduce_scatter"``, ``"all_reduce"``, ``"all_to_all"``, ``"p2p"``), while the context is active.

    Sent bytes per call, for a group of ``n`` ranks and the bandwidth-optimal (ring) algorithms NCCL uses:
    all-gather of a ``T``-byte shard ``(n − 1)·T``; reduce-scatter and all-to-all of a ``T``-byte input
    ``(n − 1)/n·T``; all-reduce ``2(n − 1)/n·T``; a P2P send ``T``.
    """
    global _COUNTER
    outer, _COUNTER = _COUNTER, CommLog()
    try:
        yield _COUNTER
    finally:
        _COUNTER = outer


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within the context, collectives move nothing: outputs are local copies of the same shapes (benchmarks only:
    the results are *not* the CP results; the time is the compute alone, with every launch still made)."""
    global _LOCAL_ONLY
    outer, _LOCAL_ONLY = _LOCAL_ONLY, True
    try:
        yield
    finally:
        _LOCAL_ONLY = outer


def _count(kind: str, group: dist.ProcessGroup | None, tensor_bytes: int) -> None:
    if _COUNTER is None:
        return
    n, _ = group_size_rank(group)
    factor = {"all_gather": n - 1, "reduce_scatter": (n - 1) / n, "all_to_all": (n - 1) / n,
              "all_reduce": 2 * (n - 1) / n, "p2p": 1}[kind]
    _COUNTER.sent[kind] += int(factor * tensor_bytes)
    _COUNTER.calls.append((kind, group, tensor_bytes))


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


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
    elif _LOCAL_ONLY:
        flat.view(size, *wire.shape).copy_(wire.unsqueeze(0).expand(size, *wire.shape))
        work = None
    else:
        _count("all_gather", group, _nbytes(wire))
        work = _all_gather_into(flat, wire, group=group, async_op=async_op)
    out = flat.view(size, *x.shape)
    return (out.view(x.dtype) if x.dtype in FP8_DTYPES else out), work


def _reduce_scatter_supported(backend: str) -> bool:
    return _REDUCE_SCATTER_OK.get(backend, True)


class PendingReduceScatter:
    """A :func:`reduce_scatter_stacked` in flight (``async_op=True``): :meth:`wait` gives this rank's slice.

    On NCCL the wait is a stream wait (the host goes on); the output may be read only on the waiting stream after
    it, or anywhere after a host-side synchronisation.
    """

    def __init__(self, result: torch.Tensor, work: dist.Work | None, source: torch.Tensor) -> None:
        # ``source`` stays referenced until the wait: its memory must not be reused while the collective reads it.
        self._result, self._work, self._source = result, work, source

    def wait(self) -> torch.Tensor:
        """This rank's summed slice [*S]."""
        if self._work is not None:
            self._work.wait()
            self._work = self._source = None
        return self._result


def reduce_scatter_stacked(
    x: torch.Tensor, group: dist.ProcessGroup | None, *, method: ReduceScatterMethod = "auto",
    async_op: bool = False,
) -> torch.Tensor | PendingReduceScatter:
    """Sum ``x`` [size, *S] over the ranks of ``group`` and return this rank's slice [*S].

    ``method="auto"`` uses the backend's reduce-scatter when it has one (NCCL; gloo in recent torch) and
    falls back to ``all_reduce`` + slice otherwise; both give the same sum. Call it with fp32 (the CP backward
    accumulates gradients in fp32 and casts back afterwards). ``async_op``: return a
    :class:`PendingReduceScatter` instead (the collective runs while the caller goes on).
    """
    size, rank = group_size_rank(group)
    if x.shape[0] != size:
        raise ValueError(f"reduce_scatter_stacked expects dim 0 == group size {size}, got shape {tuple(x.shape)}")
    result, work, source = _start_reduce_scatter(x, group, method, size, rank, async_op)
    return PendingReduceScatter(result, work, source) if async_op else result


def _start_reduce_scatter(x, group, method, size, rank, async_op):
    """``(result, work or None, the tensor the collective reads)``."""
    if size == 1:
        return x[0].clone(), None, x
    x = x.contiguous()
    if _LOCAL_ONLY:
        return x[rank].clone(), None, x
    backend = str(dist.get_backend(group))
    if method == "auto":
        method = "reduce_scatter" if _reduce_scatter_supported(backend) else "all_reduce"
    if method == "reduce_scatter":
        # gloo wants the input concatenated along dim 0: [size · n, ...] -> [n, ...]
        rows = x.reshape(size, -1) if x.dim() == 1 else x
        flat_in = rows.reshape(size * rows.shape[1], *rows.shape[2:])
        out = torch.empty(rows.shape[1:], dtype=x.dtype, device=x.device)
        try:
            work = _reduce_scatter_into(out, flat_in, group=group, async_op=async_op)
            _count("reduce_scatter", group, _nbytes(flat_in))
            return out.view(x.shape[1:]), work, flat_in
        except RuntimeError as err:
            # A backend without reduce-scatter refuses locally, before any byte moves, on every rank alike,
            # so falling back here cannot desynchronise the group.
            if "not supported" not in str(err).lower() and "unsupported" not in str(err).lower():
                raise
            _REDUCE_SCATTER_OK[backend] = False
    elif method != "all_reduce":
        raise ValueError(f"method must be 'auto', 'reduce_scatter' or 'all_reduce', got {method!r}")
    total = x.clone()
    _count("all_reduce", group, _nbytes(total))
    work = dist.all_reduce(total, group=group, async_op=async_op)
    return total[rank], work, total


def all_to_all_stacked(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``x`` [size, *S]: slice j goes to rank j; returns [size, *S] where slice j came from rank j."""
    size, _ = group_size_rank(group)
    if x.shape[0] != size:
        raise ValueError(f"all_to_all_stacked expects dim 0 == group size {size}, got shape {tuple(x.shape)}")
    wire = to_wire(x)
    if size == 1 or _LOCAL_ONLY:
        return x.clone()
    out = torch.empty_like(wire)
    _count("all_to_all", group, _nbytes(wire))
    dist.all_to_all_single(out, wire, group=group)
    return out.view(x.dtype) if x.dtype in FP8_DTYPES else out


def ring_shift(send: torch.Tensor, recv: torch.Tensor, group: dist.ProcessGroup | None) -> list:
    """Start sending ``send`` to the next rank of ``group`` and receiving the previous rank's into ``recv``.

    Returns the requests to wait on (none under :func:`local_only`, where ``recv`` gets a copy of ``send``).
    ``send`` and ``recv`` must be contiguous and of the same shape and dtype.
    """
    size, rank = group_size_rank(group)
    if _LOCAL_ONLY:
        recv.copy_(send)
        return []
    _count("p2p", group, _nbytes(send))
    return dist.batch_isend_irecv([
        dist.P2POp(dist.isend, send, global_rank(group, (rank + 1) % size), group),
        dist.P2POp(dist.irecv, recv, global_rank(group, (rank - 1) % size), group),
    ])
