"""Argument validation shared by the public ops.

Every public op checks its inputs here so that bad input fails loudly with the argument's name and the
expected form instead of producing a silently wrong result. NaN/inf scans cost a device sync, so they run
only when debug checks are on (``DSA_DEBUG=1`` or :func:`set_debug_checks`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

_DEBUG = os.environ.get("DSA_DEBUG", "0") not in ("", "0", "false", "False")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn,)


def set_debug_checks(enabled: bool) -> None:
    """Turn the NaN/inf input scans on or off (they synchronise the device)."""
    global _DEBUG
    _DEBUG = bool(enabled)


def debug_checks_enabled() -> bool:
    return _DEBUG


_debug = debug_checks_enabled


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
) -> torch.Tensor:
    """Check that ``x`` is a tensor with the given rank and dtype; raise naming ``name`` otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if _DEBUG and x.is_floating_point() and x.dtype not in FP8_DTYPES and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf (debug checks are on)")
    return x


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {desc}")


def check_dim(name: str, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}: dim {dim} ({what}) must be {expected}, got {x.shape[dim]}"
        )


def check_same_batch(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has ``ref``'s batch size (dim 0); the message names both shapes."""
    for name, x in others.items():
        if x is not None and x.shape[0] != ref.shape[0]:
            raise ValueError(f"{name} has batch size {x.shape[0]} (shape {tuple(x.shape)}) but {ref_name} has "
                             f"{ref.shape[0]} (shape {tuple(ref.shape)}): pass the same batch to both")


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


def check_positions(name: str, positions: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """Return int64 positions of shape [length] (default ``arange(length)``)."""
    if positions is None:
        return torch.arange(length, device=device)
    check_tensor(name, positions, ndim=1, dtypes=(torch.int32, torch.int64))
    if positions.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(positions.shape)}")
    if positions.device != device:
        raise ValueError(f"{name} is on {positions.device}, expected {device}")
    return positions.long()


def check_query_positions(name: str, positions: torch.Tensor | None, batch: int, length: int,
                          device: torch.device) -> torch.Tensor:
    """Query positions shared by the batch, [length], or one row per sequence, [batch, length] (decode over a
    cache, where every sequence sits at its own position); returned as int64 (default ``arange(length)``)."""
    if positions is not None and positions.dim() == 2:
        check_tensor(name, positions, ndim=2, dtypes=(torch.int32, torch.int64))
        if tuple(positions.shape) != (batch, length):
            raise ValueError(f"{name} must have shape [{length}] (shared) or [{batch}, {length}] (per sequence), "
                             f"got {tuple(positions.shape)}")
        if positions.device != device:
            raise ValueError(f"{name} is on {positions.device}, expected {device}")
        return positions.long()
    return check_positions(name, positions, length, device)


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_attention_qkv(q: object, k: object, v: object) -> None:
    """``q`` [B, Lq, H, d_qk], ``k`` [B, Lk, Hkv, d_qk], ``v`` [B, Lk, Hkv, d_v] with H a multiple of Hkv."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES)
    check_dim("k", k, 0, q.shape[0], "batch")
    check_dim("k", k, 3, q.shape[3], "d_qk, as in q")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, Lk, Hkv, d_v] with B, Lk, Hkv as k {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]}) for GQA/MQA")
