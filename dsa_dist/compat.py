"""Megatron-Core on CPU and GPU: process-group setup and the few CPU shims Megatron needs (DESIGN.md §2, §4).

Everything CPU-specific about running Megatron-Core 0.16.x lives here, so model and training code never branch on
the device for Megatron's sake.

Configuration first (no patch needed):
- models are built with ``use_cpu_initialization=True`` (weights are initialised on the host as a full master
  matrix and the TP shard is sliced out, so TP runs start from exactly the TP=1 weights);
- our attention uses its own core attention and rotary embedding (:mod:`dsa_dist.model`), never Megatron's
  ``DotProductAttention``/``RotaryEmbedding``, and GPTModel is built with ``position_embedding_type="none"``;
- dropout defaults to 0 and activation recompute is off on CPU, so Megatron's CUDA RNG tracker is never forked;
- :func:`manual_seed` seeds Megatron's CUDA RNG tracker on CUDA and only torch's generator on CPU (Megatron's
  ``model_parallel_cuda_manual_seed`` needs CUDA).

Patches, applied by :func:`apply_cpu_shims` only when ``torch.cuda.is_available()`` is False; idempotent, and
they touch ``torch.cuda`` functions only (no Megatron class is patched):
1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` instead of raising. Megatron allocates
   with ``device=torch.cuda.current_device()`` in the global memory buffer, the sequence-parallel gather/scatter
   mappings, and dist_checkpointing's save (``state_dict_saver``, ``async_utils``).
2. ``torch.cuda.synchronize()`` is a no-op (dist_checkpointing save and the fully-parallel strategies call it;
   CPU ops are synchronous anyway).

Scoped, not global: :func:`cuda_literals_to_cpu` is a ``TorchFunctionMode`` for the Megatron calls that hard-code
``device="cuda"`` (``FP32Optimizer``'s loss scale, ``forward_backward_no_pipelining``'s token counter, the
grad-norm overflow buffer): while it is active and CUDA is absent, factory calls with a CUDA device go to the CPU
and ``Tensor.cuda()`` is the identity. Nothing is patched.

Not shims but requirements: ``import megatron.core`` needs ``triton``; dist_checkpointing needs ``psutil`` and its
async writer uses multiprocessing spawn, so scripts that save checkpoints need an ``if __name__ == "__main__"``
guard.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_SHIMS_APPLIED = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_synchronize(device: object = None) -> None:
    return None


def apply_cpu_shims() -> bool:
    """Install the ``torch.cuda`` shims listed in the module docstring when CUDA is absent.

    Returns True when the shims are (now) active. A no-op on machines with CUDA and on repeated calls.
    """
    global _SHIMS_APPLIED
    if torch.cuda.is_available():
        return False
    if not _SHIMS_APPLIED:
        torch.cuda.current_device = _cpu_current_device
        torch.cuda.synchronize = _cpu_synchronize
        _SHIMS_APPLIED = True
    return True


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaLiteralsToCpu(TorchFunctionMode):
    """``device="cuda"`` (keyword, or the device argument of ``Tensor.to``) becomes the CPU; ``.cuda()`` is a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_literals_to_cpu() -> Iterator[None]:
    """Run Megatron code that hard-codes ``device="cuda"`` on the CPU (a no-op context when CUDA is present)."""
    if torch.cuda.is_available():
        yield
        return
    with _CudaLiteralsToCpu():
        yield


def default_device() -> torch.device:
    """The device this rank computes on: its CUDA device when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def manual_seed(seed: int) -> None:
    """Seed torch and, on CUDA, Megatron's model-parallel RNG tracker (``model_parallel_cuda_manual_seed``)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


@dataclass(frozen=True)
class ParallelDims:
    """Sizes and this rank's coordinates in the Megatron process grid."""

    world_size: int
    tp: int
    cp: int
    pp: int
    dp: int
    tp_rank: int
    cp_rank: int
    pp_rank: int
    dp_rank: int


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


def init_parallel(tp: int = 1, cp: int = 1, pp: int = 1, backend: str | None = None,
                  timeout_minutes: int = 30) -> ParallelDims:
    """Initialise torch.distributed (if needed) and Megatron's ``parallel_state`` for TP × CP × PP (× DP).

    The sizes are validated against the world size *before* any rendezvous or collective, so a bad configuration
    fails fast with a ``ValueError`` instead of hanging. The world size comes from an initialised default group,
    else from ``$WORLD_SIZE`` (default 1, single process: MASTER_ADDR/MASTER_PORT default to a local address).
    ``backend`` defaults to NCCL with CUDA and gloo without. Calling it again with other sizes re-creates
    Megatron's groups (the default process group is kept). On CPU the shims of :func:`apply_cpu_shims` are applied.
    """
    from megatron.core import parallel_state

    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    validate_parallel_sizes(world_size, tp, cp, pp)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (auto), got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA; use backend='gloo' (or None) on CPU")
    apply_cpu_shims()

    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))

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
            distributed_timeout_minutes=timeout_minutes,
        )
    return current_parallel_dims()


def current_parallel_dims() -> ParallelDims:
    """Sizes and ranks of the initialised Megatron grid (TP=CP=PP=DP=1 when ``parallel_state`` is not set up)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return ParallelDims(1, 1, 1, 1, 1, 0, 0, 0, 0)
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
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call when nothing is initialised)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
