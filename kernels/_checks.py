"""Input checks of the Triton wrappers in this package.

``kernels/`` depends on torch and triton only, so it carries its own small validators instead of borrowing the
reference ops' ones. A kernel reads raw pointers: a wrong batch size or an out-of-range row index is not an
exception there but a read past a buffer, so every wrapper checks shapes, dtypes, devices and index ranges
before it launches and raises ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn,)


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


def check_index_range(name: str, indices: torch.Tensor, n_keys: int) -> None:
    """Entries of ``indices`` lie in [−1, n_keys): −1 is an empty slot, anything else a key row.

    One min/max reduction and one host sync per call — the price of never gathering past the key buffer.
    """
    if indices.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(indices)).tolist()  # one device-to-host copy
    if hi >= n_keys or lo < -1:
        raise ValueError(f"{name} must hold key rows in [0, {n_keys}) or -1 for an empty slot, got min {lo} and "
                         f"max index {hi} with L = {n_keys} keys")


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
