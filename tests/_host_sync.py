"""Record every host synchronisation a block of code *asks for*, on any device (a CPU test helper).

On CUDA, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``), an op whose
output size depends on the data (``nonzero``, ``unique``, boolean-mask indexing) and building a tensor from
Python data on a device (``torch.tensor(..., device=...)``: a blocking host-to-device copy) all wait for the GPU
stream. On CPU they cost nothing, so a CPU run cannot measure them — but it can see them being *called*.
:class:`HostSyncRecorder` is a ``TorchFunctionMode`` that lists each such call with the caller's file and line,
so a test can assert that a hot path asks for none. The same code runs on CUDA, where these calls are the syncs.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods / functions that read tensor data on the host, or whose output shape depends on the data.
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "cpu", "numpy",
          "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "equal", "allclose"}
_FACTORIES = {"tensor", "as_tensor"}  # from Python data: a blocking copy when a device is named


def _name(func: object) -> str:
    return getattr(func, "__name__", str(func))


def _has_bool_mask(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncRecorder(TorchFunctionMode):
    """``with HostSyncRecorder() as rec: ...`` — afterwards ``rec.calls`` lists ``"op at file:line"`` per sync."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def _record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        self.calls.append(f"{what} at {where}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name in _READS:
            self._record(name)
        elif name in _FACTORIES and kwargs.get("device") is not None:
            self._record(f"torch.{name}(..., device=)")
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1 \
                and _has_bool_mask(args[1]):
            self._record(f"{name} with a boolean mask")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self._record("repeat_interleave without output_size")
        return func(*args, **kwargs)
