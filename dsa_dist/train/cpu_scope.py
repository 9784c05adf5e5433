"""One scope for Megatron's hard-coded ``device="cuda"`` literals on CPU, entered once per entry point.

:func:`megatron_cpu_scope` enters :func:`dsa_dist.compat.cuda_literals_to_cpu` (a no-op with CUDA) unless this
thread is already inside it, so a stage run enters it once at its entry (:func:`dsa_dist.train.pipeline.run_stage`,
or a trainer part's public method when called on its own) and the per-step code inside costs nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any, TypeVar

from dsa_dist.compat import cuda_literals_to_cpu

_state = threading.local()
F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def megatron_cpu_scope() -> Iterator[None]:
    """Enter :func:`~dsa_dist.compat.cuda_literals_to_cpu` unless this thread already is inside it."""
    depth = getattr(_state, "depth", 0)
    if depth:
        _state.depth = depth + 1
        try:
            yield
        finally:
            _state.depth = depth
        return
    with cuda_literals_to_cpu():
        _state.depth = 1
        try:
            yield
        finally:
            _state.depth = 0


def in_megatron_cpu_scope(fn: F) -> F:
    """Decorator: run ``fn`` inside :func:`megatron_cpu_scope` (public entry points of the trainer parts)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        with megatron_cpu_scope():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
