"""Run a function on N real processes joined by a gloo process group (shared by multi-rank tests).

Usage::

    def _worker(rank: int, world_size: int, arg) -> dict:   # module-level, so it pickles
        ...                                                # torch.distributed is initialised (gloo)
        return {"out": tensor}                             # anything torch.save can write

    results = run_distributed(_worker, 4, arg)             # list indexed by rank

Workers are started from a ``forkserver`` that has already imported torch (and Megatron-Core when it is
installed), so each rank does not pay the multi-second import again: on the 2-core CI machine that import is
most of a small test's time. The forkserver itself runs no torch ops, so forking from it is safe with OpenMP.

A failing rank's traceback is re-raised in the parent, the other ranks are killed (they would otherwise wait in a
collective forever), and the whole run has a wall-clock ``timeout``.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

# Modules the forkserver imports once; a module that fails to import is skipped by multiprocessing.
_PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state", "megatron.core.models.gpt"]
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(_PRELOAD)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    # torch.save into bytes: tensors travel by value, not through shared-memory handles that die with the worker.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, init: bool, threads: int,
           args: tuple, result_q: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        if init:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    init_method=f"tcp://127.0.0.1:{port}")
        out = fn(rank, world_size, *args)
        result_q.put((rank, True, _dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        result_q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown must not mask the result
            pass


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0,
                    init_process_group: bool = True, threads: int = 1, daemon: bool = True) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes and return the results by rank.

    ``fn`` must be a module-level function and its arguments/results picklable (tensors are fine).
    With ``init_process_group=True`` (default) each rank joins a gloo group on 127.0.0.1 before ``fn`` runs;
    otherwise only MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE are set (for code that initialises itself, e.g.
    ``dsa_dist.parallel.init_parallel``). Raises ``RuntimeError`` with the first failing rank's traceback, or
    ``TimeoutError`` after ``timeout`` seconds. ``daemon=False`` is for ranks that start processes themselves
    (dist_checkpointing's torch_dist writer starts a multiprocessing Manager, which a daemon may not).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    port = free_port()
    result_q = _CTX.Queue()
    procs = [
        _CTX.Process(target=_entry, args=(fn, r, world_size, port, init_process_group, threads, args, result_q),
                     daemon=daemon)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"run_distributed({fn.__name__}, world_size={world_size}) timed out after "
                                   f"{timeout:.0f}s; ranks done: {sorted(results)}")
            try:
                rank, ok, payload = result_q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                                       "before reporting a result") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = _loads(payload)
    finally:
        for p in procs:
            # non-daemonic ranks may still be flushing a checkpoint writer: give them longer
            p.join(timeout=(5.0 if daemon else 30.0) if len(results) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        result_q.close()
    return [results[r] for r in range(world_size)]


@contextlib.contextmanager
def single_rank_parallel() -> Iterator[None]:
    """TP=CP=1 Megatron parallel state in this process (a one-rank group; NCCL on CUDA, gloo on CPU).

    Tears down only what it created, so a caller that already joined a process group keeps it.
    """
    import torch.distributed as dist

    from dsa_dist.parallel import destroy_parallel, init_parallel

    owned = not dist.is_initialized()
    if owned:
        # No MASTER_PORT: init_parallel's single-process rendezvous then binds a free port itself.
        os.environ.pop("MASTER_PORT", None)
        os.environ.update(RANK="0", WORLD_SIZE="1")
    init_parallel(1, 1)
    try:
        yield
    finally:
        if owned:
            destroy_parallel()
