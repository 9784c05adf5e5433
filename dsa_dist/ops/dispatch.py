"""The one place that picks the implementation of each DSA op: Triton kernels on CUDA, the reference elsewhere.

Kernels in ``kernels/`` have the *same* signatures as the reference ops, so callers (the Megatron modules, the
CP code, the benchmarks) call ``dsa_dist.ops.dispatch.<op>`` and never branch on the device themselves.
``dense_attention``'s "kernel" is :mod:`dsa_dist.ops.fused_dense` (PyTorch's fused flash / memory-efficient
attention, no Triton of ours); the rule below treats it as any kernel.

``DSA_BACKEND`` (environment, read on every call):

* ``auto`` (default) — the Triton kernel for CUDA tensors, the reference op for any other device.
* ``reference`` — the reference op everywhere. On CUDA tensors that is slow, so it is logged once per op and
  counted (:func:`reference_fallbacks`): a run can report that it never used the kernels.
* ``triton`` — the kernel everywhere; CPU tensors need Triton's interpreter (``TRITON_INTERPRET=1``, set before
  the kernels are imported), which is how the CPU tests run the kernels.

A kernel that cannot be imported, or fails, on CUDA raises: there is no silent switch to the reference op.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Literal

import torch

Backend = Literal["auto", "reference", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "reference", "triton")

# op name -> ("reference module:function", "kernel module:function"); imported on first use, which keeps this
# module free of import cycles (the reference ops themselves call dispatch.fp8_block_quant).
_OPS: dict[str, tuple[str, str]] = {
    name: (f"dsa_dist.ops.{ref}:{name}", f"{kernel}:{name}")
    for name, ref, kernel in (
        ("sparse_attention", "sparse_attention", "kernels.sparse_attention"),
        ("lightning_indexer_topk", "topk", "kernels.indexer_topk"),
        ("fp8_block_quant", "fp8", "kernels.fp8_quant"),
        ("indexer_kl_loss_dense", "kl", "kernels.indexer_kl"),
        ("indexer_kl_loss_sparse", "kl", "kernels.indexer_kl"),
        ("dense_attention", "dense_attention", "dsa_dist.ops.fused_dense"),
        ("sparse_attention_with_indexer_kl", "sparse_attention_kl", "kernels.sparse_attention_kl"),
    )
}

_log = logging.getLogger(__name__)
# Calls on CUDA tensors that ran the reference op because DSA_BACKEND=reference asked for it, per op.
_reference_on_cuda: Counter[str] = Counter()


def selected_backend() -> Backend:
    """The backend ``DSA_BACKEND`` asks for (default ``auto``)."""
    value = os.environ.get("DSA_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"DSA_BACKEND must be 'auto', 'reference' or 'triton', got {value!r}")
    return value  # type: ignore[return-value]


def interpreter_requested() -> bool:
    """``TRITON_INTERPRET=1``: Triton's interpreter runs the kernels on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def reference_fallbacks() -> dict[str, int]:
    """How many calls on CUDA tensors ran the reference op (``DSA_BACKEND=reference``), per op name."""
    return dict(_reference_on_cuda)


def _load(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def resolve(op: str, device: torch.device | str, backend: Backend | None = None) -> Callable:
    """The callable that runs ``op`` for tensors on ``device`` (see the module docstring for the rule)."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; dispatched ops are {sorted(_OPS)}")
    reference, kernel = _OPS[op]
    chosen = backend or selected_backend()
    device = torch.device(device)
    if chosen == "reference" or (chosen == "auto" and device.type != "cuda"):
        if device.type == "cuda":
            if not _reference_on_cuda[op]:
                _log.warning("DSA_BACKEND=reference: %s runs the PyTorch reference op on CUDA (slow); "
                             "unset DSA_BACKEND to use the Triton kernel", op)
            _reference_on_cuda[op] += 1
        return _load(reference)
    if device.type != "cuda" and not interpreter_requested():
        raise RuntimeError(f"DSA_BACKEND=triton: {op} got tensors on {device}; the Triton kernels need CUDA "
                           "tensors, or TRITON_INTERPRET=1 to run in Triton's interpreter on CPU")
    try:
        return _load(kernel)
    except ImportError as err:  # e.g. triton missing: an error, never a quiet switch to the slow reference
        raise RuntimeError(f"{op} needs the Triton kernel {kernel} on {device}, which cannot be imported "
                           f"({err}); install triton, or set DSA_BACKEND=reference to run the reference op") from err


def sparse_attention(q: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dsa_dist.ops.sparse_attention` on ``q``'s device: ``(out, lse)``."""
    return resolve("sparse_attention", q.device)(q, *args, **kwargs)


def lightning_indexer_topk(q_index: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dsa_dist.ops.lightning_indexer_topk` on ``q_index``'s device: ``(scores, indices)``."""
    return resolve("lightning_indexer_topk", q_index.device)(q_index, *args, **kwargs)


def fp8_block_quant(x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dsa_dist.ops.fp8_block_quant` on ``x``'s device: ``(x_fp8, scale)``, the same bits either way."""
    return resolve("fp8_block_quant", x.device)(x, *args, **kwargs)


def dense_attention(q: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dsa_dist.ops.dense_attention` on ``q``'s device (CUDA: the fused one): ``(out, lse)``."""
    return resolve("dense_attention", q.device)(q, *args, **kwargs)


def _require_lse(op: str, kwargs: dict) -> None:
    # The kernel needs the attention's lse; asking for it on every backend keeps CPU and GPU runs alike.
    if kwargs.get("attn_lse") is None:
        raise ValueError(f"{op} needs attn_lse=[B, Lq, H], the log-sum-exp the attention returns: "
                         "out, attn_lse = dense_attention(...) (dense loss) or sparse_attention(...) (sparse loss)")


def indexer_kl_loss_dense(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """:func:`dsa_dist.ops.indexer_kl_loss_dense` on ``q``'s device; ``attn_lse`` is required."""
    _require_lse("indexer_kl_loss_dense", kwargs)
    return resolve("indexer_kl_loss_dense", q.device)(q, *args, **kwargs)


def indexer_kl_loss_sparse(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """:func:`dsa_dist.ops.indexer_kl_loss_sparse` on ``q``'s device; ``attn_lse`` is required."""
    _require_lse("indexer_kl_loss_sparse", kwargs)
    return resolve("indexer_kl_loss_sparse", q.device)(q, *args, **kwargs)


def sparse_attention_with_indexer_kl(q: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, ...]:
    """:func:`dsa_dist.ops.sparse_attention_with_indexer_kl` on ``q``'s device: ``(out, lse, kl_proxy, kl_value)``,
    ``kl_value`` filled by the backward."""
    return resolve("sparse_attention_with_indexer_kl", q.device)(q, *args, **kwargs)
