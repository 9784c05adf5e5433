"""One decode step replayed as a CUDA graph (docs/grpo.md, "Decode speed").

A decode step of the ``small`` model issues about 6,500 PyTorch ops (12 layers of projections, rotary, FP8 index
queries, top-k over the cache, sparse attention, MLP) for one token per sequence. On an H100 the host needs
~50 ms to launch them while the GPU work is a few ms, so eager decoding is launch-bound at every batch size
(benchmarks/results/decode_h100_run1.md). Serving stacks capture the step once and replay it; this module does
the same for :class:`dsa_dist.rl.engine.DecodeEngine`:

- the step's inputs (``tokens`` [B], ``positions`` [B]) are copied into static device buffers, and the graph
  replays every launch of ``engine.step`` on them — the cache writes included, so the cache advances exactly as
  in eager mode;
- outputs (logits [B, V] and, with ``record_topk``, each layer's selected indices) live in the graph's memory
  pool and are overwritten by the next replay: :meth:`GraphedDecodeStep.__call__` returns clones.

Requirements, checked or enforced: CUDA tensors, TP = CP = 1 (collectives inside a graph are not captured here), and a
step without host synchronisation (a sync inside the capture raises; capture failure is reported, never hidden —
``fallback="eager"`` runs eagerly after logging the reason once, ``fallback="raise"`` re-raises). With the debug
value checks on (``DSA_DEBUG=1``, which read values on the host) the step is not captured at all.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from dsa_dist.ops._checks import debug_checks_enabled

_log = logging.getLogger(__name__)


class GraphedDecodeStep:
    """``engine.step`` captured once into a CUDA graph and replayed per token.

    Args:
        engine: a :class:`~dsa_dist.rl.engine.DecodeEngine` on CUDA with TP = CP = 1.
        warmup_steps: eager steps run (on a side stream) before capture, so Triton compiles and autotunes and
            the caching allocator settles outside the graph. Capture happens on the first call with that call's
            inputs: the warm-up steps write the same token at the same cache rows as the first replay, so the
            cache and the first call's result are exactly those of an eager step.
        fallback: what happens when capture is impossible: ``"eager"`` (log once, run ``engine.step``) or
            ``"raise"``.
    """

    def __init__(self, engine, *, warmup_steps: int = 2, fallback: Literal["eager", "raise"] = "eager") -> None:
        if fallback not in ("eager", "raise"):
            raise ValueError(f"fallback must be 'eager' or 'raise', got {fallback!r}")
        self.engine = engine
        self.fallback = fallback
        self.warmup_steps = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.reason: str | None = None  # why the step runs eagerly, when it does
        self._static_tokens: torch.Tensor | None = None
        self._static_positions: torch.Tensor | None = None
        self._static_out: tuple[torch.Tensor, dict[int, torch.Tensor] | None] | None = None
        device = torch.device(engine.device)
        if device.type != "cuda":
            self._eager(f"the engine runs on {device}, CUDA graphs need a CUDA device")
        elif debug_checks_enabled():
            # Debug checks read values on the host: a sync inside capture fails it, and a failed capture can leave
            # the CUDA generator in capture state (later random ops raise), so it is not attempted.
            self._eager("DSA_DEBUG=1: the debug value checks synchronise with the host")
        elif engine.dims.cp > 1 or engine.dims.tp > 1:
            self._eager(f"model-parallel decode (tp={engine.dims.tp}, cp={engine.dims.cp}) runs collectives; "
                        "only tp = cp = 1 is captured")

    @property
    def graphed(self) -> bool:
        """Whether steps replay a captured graph (False: eager, see :attr:`reason`)."""
        return self.graph is not None

    def _eager(self, reason: str) -> None:
        if self.fallback == "raise":
            raise RuntimeError(f"cannot capture the decode step as a CUDA graph: {reason}")
        if self.reason is None:
            _log.warning("decode step runs eagerly (no CUDA graph): %s", reason)
        self.reason = reason

    def capture(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Warm up and capture the step at these inputs (their rows of the cache are written)."""
        eng = self.engine
        self._static_tokens = tokens.to(eng.device).long().clone()
        self._static_positions = positions.to(eng.device).long().clone()
        side = torch.cuda.Stream(device=eng.device)
        side.wait_stream(torch.cuda.current_stream(eng.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup_steps):
                    eng.step(self._static_tokens, self._static_positions)
            torch.cuda.current_stream(eng.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static_out = eng.step(self._static_tokens, self._static_positions)
        except Exception as exc:  # noqa: BLE001 - reported (or re-raised), never silently swallowed
            torch.cuda.synchronize(eng.device)
            self._static_out = None
            self._eager(f"capture failed: {type(exc).__name__}: {str(exc)[:300]}")
            if self.fallback == "raise":  # pragma: no cover - _eager raised already
                raise
            return
        self.graph = graph

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
        """``engine.step(tokens, positions)``: replayed when captured (capturing on the first call), else eager."""
        if self.graph is None and self.reason is None:
            self.capture(tokens, positions)
        if self.graph is None:
            return self.engine.step(tokens, positions)
        if tokens.shape != self._static_tokens.shape or positions.shape != self._static_positions.shape:
            raise ValueError(f"a graphed step takes tokens and positions of shape {tuple(self._static_tokens.shape)},"
                             f" got {tuple(tokens.shape)} and {tuple(positions.shape)}")
        self._static_tokens.copy_(tokens, non_blocking=True)
        self._static_positions.copy_(positions, non_blocking=True)
        self.graph.replay()
        logits, selected = self._static_out
        return logits.clone(), (None if selected is None else {k: v.clone() for k, v in selected.items()})
