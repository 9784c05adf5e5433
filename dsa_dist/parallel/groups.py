"""Process groups: the one description of this rank's place in the TP × CP × PP × DP grid (docs/design.md §2).

Megatron-Core's ``parallel_state`` owns the groups; this module sets it up and reads it back:

- :func:`init_parallel` joins (or creates) the default process group and builds Megatron's groups. Sizes are
  checked against the world size first (:func:`validate_parallel_sizes`), so a bad layout fails with a
  ``ValueError`` before any rendezvous can hang. ``timeout_s`` is the collective timeout of every group (a
  stuck rank ends the job after it instead of Megatron's 30-minute default). On a machine without CUDA it applies
  the CPU shims of :mod:`dsa_dist.compat` once, here at the entry point.
- A **single-process** run without ``MASTER_PORT`` rendezvouses through a ``TCPStore`` bound to port 0: the
  operating system picks a free port atomically, so two runs on one machine never collide.
- :func:`current_parallel_dims` returns a frozen :class:`ParallelDims` (sizes, ranks, the TP and CP groups) that
  the model reads once at construction; :func:`destroy_parallel` tears everything down.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class ParallelDims:
    """Sizes, this rank's coordinates and its TP/CP process groups in the Megatron grid.

    ``world_size = tp * cp * pp * dp``. The groups are ``None`` when ``parallel_state`` is not initialised (one
    process, nothing to communicate); every collective helper treats a size of 1 as "no communication".
    """

    world_size: int = 1
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    cp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    """Tensor-parallel group (attention heads, MLP and vocabulary are split over it)."""
    cp_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    """Context-parallel group (the sequence is split zigzag over it)."""

    def local_positions(self, local_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions [local_len] of this rank's tokens: the zigzag chunks under CP, ``arange`` otherwise.

        Built once per (layout, length, device) and shared — read only: every DSA layer asks for them, and at small
        shards a CP step is bound by host-side launches (docs/context_parallel.md). Being the same tensor also lets
        the distributed top-k see by identity, without a device check, that keys sit at these positions.
        """
        return _local_positions(self.local_blocks(local_len), None if device is None else str(device))

    def local_blocks(self, local_len: int) -> tuple[tuple[int, int], ...]:
        """:meth:`local_positions` as runs ``((start, length), ...)`` of Python ints (the fused dense attention's
        synchronisation-free ``q_blocks``)."""
        if self.cp == 1:
            return ((0, local_len),)
        from dsa_dist.parallel.sharding import zigzag_blocks

        return zigzag_blocks(local_len * self.cp, self.cp, self.cp_rank)


@functools.lru_cache(maxsize=256)
def _local_positions(blocks: tuple[tuple[int, int], ...], device: str | None) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor even when first built in inference mode (rollouts)
        return torch.cat([torch.arange(start, start + n, device=device) for start, n in blocks])


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def validate_parallel_sizes(world_size: int, tp: int, cp: int, pp: int = 1) -> int:
    """Check that ``world_size`` splits into TP × CP × PP × DP; returns DP. Raises ``ValueError`` naming the fix."""
    for name, value in (("world_size", world_size), ("tp", tp), ("cp", cp), ("pp", pp)):
        _check_size(name, value)
    model_parallel = tp * cp * pp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = {model_parallel}; "
            f"launch a multiple of {model_parallel} processes or change the parallel sizes"
        )
    return world_size // model_parallel


def _init_process_group(backend: str, world_size: int, timeout: timedelta) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        # Port 0: the OS binds a free port at once (no probe-then-bind race), so concurrent runs never collide.
        store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), 0, world_size=1, is_master=True,
                              timeout=timeout, wait_for_workers=False)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        return
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # an explicit MASTER_PORT alone names a local port
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)


def init_parallel(tp: int = 1, cp: int = 1, pp: int = 1, backend: str | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelDims:
    """Initialise torch.distributed (if needed) and Megatron's ``parallel_state`` for TP × CP × PP (× DP).

    Args:
        tp, cp, pp: tensor-, context- and pipeline-parallel sizes; DP is what remains of the world size.
        backend: ``"nccl"`` / ``"gloo"``; None picks NCCL with CUDA and gloo without.
        timeout_s: collective timeout in seconds, given to ``init_process_group`` and to Megatron's
            ``initialize_model_parallel`` (a rank that stops makes the others fail after this long).

    The world size comes from an initialised default group, else from ``$WORLD_SIZE`` (default 1). With one
    process and no ``$MASTER_PORT`` a free port is chosen (see the module docstring). Calling it again with other
    sizes re-creates Megatron's groups (the default process group is kept). Returns :func:`current_parallel_dims`.
    """
    from megatron.core import parallel_state

    from dsa_dist.compat import apply_cpu_shims

    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    validate_parallel_sizes(world_size, tp, cp, pp)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (auto), got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA; use backend='gloo' (or None) on CPU")
    apply_cpu_shims()

    timeout = timedelta(seconds=float(timeout_s))
    if not dist.is_initialized():
        _init_process_group(backend, world_size, timeout)

    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_context_parallel_world_size() == cp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            distributed_timeout_minutes=timeout_s / 60.0,  # Megatron builds timedelta(minutes=...): floats work
        )
    return current_parallel_dims()


def current_parallel_dims() -> ParallelDims:
    """The initialised Megatron grid (TP=CP=PP=DP=1 and no groups when ``parallel_state`` is not set up)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return ParallelDims()
    return ParallelDims(
        world_size=dist.get_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call when nothing is initialised)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
