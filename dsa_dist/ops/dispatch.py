"""Pick the implementation of each DSA op: Triton kernels on CUDA, the reference ops elsewhere.

Kernels in ``kernels/`` expose the *same* signatures as the reference ops, so callers (the Megatron modules,
the CP code, the benchmarks) call ``dsa_dist.ops.dispatch.<op>`` and never branch on the device themselves.
``DSA_BACKEND=reference`` forces the reference everywhere (debugging); ``DSA_BACKEND=triton`` forces the
kernels, also on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Literal

import torch

from dsa_dist.ops import fp8 as _fp8
from dsa_dist.ops import kl as _kl
from dsa_dist.ops import topk as _topk

# ``dsa_dist.ops.sparse_attention`` is also the name of the re-exported function: load the module by path.
_sparse = importlib.import_module("dsa_dist.ops.sparse_attention")

Backend = Literal["auto", "reference", "triton"]

# op name -> (reference callable, "kernels.module:function")
_OPS: dict[str, tuple[Callable, str]] = {
    "sparse_attention": (_sparse.sparse_attention, "kernels.sparse_attention:sparse_attention"),
    "lightning_indexer_topk": (_topk.lightning_indexer_topk, "kernels.indexer_topk:lightning_indexer_topk"),
    "fp8_block_quant": (_fp8.fp8_block_quant, "kernels.fp8_quant:fp8_block_quant"),
    "indexer_kl_loss_dense": (_kl.indexer_kl_loss_dense, "kernels.indexer_kl:indexer_kl_loss_dense"),
    "indexer_kl_loss_sparse": (_kl.indexer_kl_loss_sparse, "kernels.indexer_kl:indexer_kl_loss_sparse"),
}


def _backend() -> Backend:
    value = os.environ.get("DSA_BACKEND", "auto")
    if value not in ("auto", "reference", "triton"):
        raise ValueError(f"DSA_BACKEND must be 'auto', 'reference' or 'triton', got {value!r}")
    return value  # type: ignore[return-value]


def _load_kernel(target: str) -> Callable | None:
    module, name = target.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def resolve(op: str, device: torch.device, backend: Backend | None = None) -> Callable:
    """The callable that runs ``op`` for tensors on ``device``."""
    reference, target = _OPS[op]
    backend = backend or _backend()
    if backend == "reference":
        return reference
    kernel = _load_kernel(target)
    if backend == "triton":
        if kernel is None:
            raise RuntimeError(f"DSA_BACKEND=triton but {target} is not importable (is triton installed?)")
        return kernel
    return kernel if (kernel is not None and device.type == "cuda") else reference


def sparse_attention(q: torch.Tensor, *args, **kwargs):
    return resolve("sparse_attention", q.device)(q, *args, **kwargs)


def lightning_indexer_topk(q_index: torch.Tensor, *args, **kwargs):
    return resolve("lightning_indexer_topk", q_index.device)(q_index, *args, **kwargs)


def fp8_block_quant(x: torch.Tensor, *args, **kwargs):
    return resolve("fp8_block_quant", x.device)(x, *args, **kwargs)


def indexer_kl_loss_dense(q: torch.Tensor, *args, **kwargs):
    return resolve("indexer_kl_loss_dense", q.device)(q, *args, **kwargs)


def indexer_kl_loss_sparse(q: torch.Tensor, *args, **kwargs):
    return resolve("indexer_kl_loss_sparse", q.device)(q, *args, **kwargs)
