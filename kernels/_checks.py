"""Input checks of the Triton wrappers in this package.

``kernels/`` depends on torch and triton only, so it carries its own small validators instead of borrowing the
reference ops' ones. A kernel reads raw pointers: a wrong batch size or an out-of-range row index is not an
exception there but a read past a buffer, so every wrapper checks shapes, dtypes, devices and index ranges
before it launches and raises ``ValueError``/``TypeError`` naming the argument. Checks of *values* (index
ranges) run on the device without a host sync (:func:`assert_on_device`): a ``ValueError`` on CPU, a
device-side assertion ahead of the kernel on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn,)


def _debug() -> bool:
    # The same switch as dsa_dist.ops' debug checks (kernels/ does not import dsa_dist): DSA_DEBUG=1.
    return os.environ.get("DSA_DEBUG", "0") not in ("", "0", "false", "False")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, x: object, *, ndim: int | None = None,
                 dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    """``x`` is a tensor of rank ``ndim`` with a dtype in ``dtypes``; raise naming ``name`` otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {_dtype_name(x.dtype)}")
    return x


def check_dim(name: str, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """``x.shape[dim] == expected`` (``what`` names the dimension in the message)."""
    if x.shape[dim] != expected:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: dim {dim} ({what}) must be {expected}, "
                         f"got {x.shape[dim]}")


def check_same_batch(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has ``ref``'s batch size (dim 0); the message names both shapes."""
    for name, x in others.items():
        if x is not None and x.shape[0] != ref.shape[0]:
            raise ValueError(f"{name} has batch size {x.shape[0]} (shape {tuple(x.shape)}) but {ref_name} has "
                             f"{ref.shape[0]} (shape {tuple(ref.shape)}): pass the same batch to both")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {desc}")


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_positions(name: str, positions: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """Contiguous int64 positions of shape [length] on ``device`` (default ``arange(length)``)."""
    if positions is None:
        return torch.arange(length, device=device)
    check_tensor(name, positions, ndim=1, dtypes=(torch.int32, torch.int64))
    if positions.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(positions.shape)}")
    if positions.device != device:
        raise ValueError(f"{name} is on {positions.device}, expected {device}")
    return positions.long().contiguous()


def assert_on_device(ok: torch.Tensor, describe: Callable[[], str]) -> None:
    """Raise ``ValueError(describe())`` unless the one-element bool tensor ``ok`` is True — without a host sync.

    A value check (are the indices in range, are the positions increasing) needs the data, which lives on the
    device; reading it on the host (``bool(t)``, ``.item()``) stalls the CPU until the GPU has caught up, and at
    small shards a training step is bound by host work (docs/design.md, "No host sync per layer"). So:

    - CUDA: ``torch._assert_async`` queues a device-side assertion on the current stream, ahead of the kernels
      that rely on the check. On failure the CUDA context aborts ("device-side assert triggered") at the next
      synchronisation; run the same inputs on CPU, or with ``DSA_DEBUG=1``, for the message of ``describe``.
    - CPU (and ``DSA_DEBUG=1`` on any device): the value is read now and ``ValueError(describe())`` is raised.

    ``describe`` is called only on failure, so its message may read the data (min, max, ...).
    """
    if _debug() and ok.device.type != "cpu":
        if not bool(ok):  # debug: a sync, for the clear message
            raise ValueError(describe())
        return
    try:
        torch._assert_async(ok, "dsa_dist input check failed")  # CPU: raises now; CUDA: no sync
    except RuntimeError:
        raise ValueError(describe()) from None


def check_index_range(name: str, indices: torch.Tensor, n_keys: int) -> None:
    """Entries of ``indices`` lie in [−1, n_keys): −1 is an empty slot, anything else a key row.

    One min/max reduction and a device-side assertion (:func:`assert_on_device`): no host sync on CUDA.
    """
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices)
    ok = torch.logical_and(lo >= -1, hi < n_keys)

    def describe() -> str:
        low, high = torch.stack([lo, hi]).tolist()
        return (f"{name} must hold key rows in [0, {n_keys}) or -1 for an empty slot, got min {low} and "
                f"max index {high} with L = {n_keys} keys")

    assert_on_device(ok, describe)


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def check_launchable(kernel: object, x: torch.Tensor) -> None:
    """A compiled kernel needs CUDA tensors; only Triton's interpreter (``TRITON_INTERPRET=1`` set before the
    kernels were imported) runs them on CPU tensors. This decides nothing, it only turns Triton's pointer error
    into one that says what to do."""
    if not x.is_cuda and not isinstance(kernel, InterpretedFunction):
        raise ValueError(f"the Triton kernels need CUDA tensors, got a tensor on {x.device}; use the reference ops "
                         "in dsa_dist.ops (or dsa_dist.ops.dispatch), or set TRITON_INTERPRET=1 before importing "
                         "kernels to run them in Triton's interpreter")


def check_indexer_inputs(q_index: object, k_index: object, weights: object, k_scale: object) -> None:
    """``q_index`` [B, Lq, H_I, d_I], ``k_index`` [B, Lk, d_I] (float or e4m3), ``weights`` [B, Lq, H_I] and
    ``k_scale`` [B, Lk] or None, on one device."""
    check_tensor("q_index", q_index, ndim=4, dtypes=FLOAT_DTYPES + FP8_DTYPES)
    check_tensor("k_index", k_index, ndim=3, dtypes=FLOAT_DTYPES + FP8_DTYPES)
    check_tensor("weights", weights, ndim=3, dtypes=FLOAT_DTYPES)
    b, lq, h, d = q_index.shape
    check_same_batch("q_index", q_index, k_index=k_index, weights=weights)
    check_dim("k_index", k_index, 2, d, "d_I, as in q_index")
    check_dim("weights", weights, 1, lq, "query length, as in q_index")
    check_dim("weights", weights, 2, h, "indexer heads, as in q_index")
    if k_scale is not None:
        check_tensor("k_scale", k_scale, ndim=2, dtypes=(torch.float32, torch.float64))
        if k_scale.shape != k_index.shape[:2]:
            raise ValueError(f"k_scale must have shape {tuple(k_index.shape[:2])} (k_index's [B, Lk]), "
                             f"got {tuple(k_scale.shape)}")
    check_same_device(q_index=q_index, k_index=k_index, weights=weights, k_scale=k_scale)
