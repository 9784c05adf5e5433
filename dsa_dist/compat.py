"""Megatron-Core on CPU: the few shims Megatron needs without CUDA, and the device helpers (docs/design.md §4).

Everything CPU-specific about running Megatron-Core 0.16.x lives here, so model and training code never branch on
the device for Megatron's sake. Process-group setup lives in :mod:`dsa_dist.parallel.groups`.

Where they are applied: :func:`apply_cpu_shims` runs once at the entry points — :func:`dsa_dist.parallel.init_parallel`
and :func:`dsa_dist.model.build_model` both call it (it is idempotent), so code below them never does.

Configuration first (no patch needed):
- models are built with ``use_cpu_initialization=True`` (weights are initialised on the host as a full master
  matrix and the TP shard is sliced out, so TP runs start from exactly the TP=1 weights);
- our attention uses its own core attention and rotary embedding (:mod:`dsa_dist.model`), never Megatron's
  ``DotProductAttention``/``RotaryEmbedding``, and GPTModel is built with ``position_embedding_type="none"``;
- dropout defaults to 0, so Megatron's CUDA RNG tracker is never forked (activation recompute saves and restores
  the RNG states around the recomputed forward: see shim 3);
- :func:`manual_seed` seeds Megatron's CUDA RNG tracker on CUDA and only torch's generator on CPU (Megatron's
  ``model_parallel_cuda_manual_seed`` needs CUDA).

Patches, applied by :func:`apply_cpu_shims` only when ``torch.cuda.is_available()`` is False; idempotent, and
they touch ``torch.cuda`` functions only (no Megatron class is patched):
1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` instead of raising. Megatron allocates
   with ``device=torch.cuda.current_device()`` in the global memory buffer, the sequence-parallel gather/scatter
   mappings, and dist_checkpointing's save (``state_dict_saver``, ``async_utils``).
2. ``torch.cuda.synchronize()`` is a no-op (dist_checkpointing save and the fully-parallel strategies call it;
   CPU ops are synchronous anyway).
3. ``torch.cuda.random.get_rng_state()`` (also ``torch.cuda.get_rng_state``) returns an empty byte tensor: Megatron's
   activation recompute (``tensor_parallel.CheckpointFunction``) saves the CUDA generator's state next to the CPU
   one and restores both before recomputing. Without CUDA there is no such generator to save; Megatron's restore
   (``_set_cuda_rng_state``) is queued by torch's lazy CUDA init and never runs. The CPU generator, which CPU ops
   draw from, is saved and restored by Megatron itself.

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
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_SHIMS_APPLIED = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_synchronize(device: object = None) -> None:
    return None


def _cpu_cuda_rng_state(device: object = "cuda") -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


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
        torch.cuda.random.get_rng_state = _cpu_cuda_rng_state
        torch.cuda.get_rng_state = _cpu_cuda_rng_state
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
