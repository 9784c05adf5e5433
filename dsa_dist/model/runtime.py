"""What a DSA model computes in its forward passes, chosen per model and passed explicitly (docs/design.md §1).

The architecture (:class:`~dsa_dist.model.config.DSAModelConfig`) is immutable; the runtime choice is a second
frozen value given to :func:`dsa_dist.model.build_model` and held by every DSA layer:

=================  ===========  ===========  ============================================================
use                attention    indexer_kl   what the layers compute
=================  ===========  ===========  ============================================================
dense pre-train    ``dense``    False        causal attention only (the indexer does not run)
indexer warm-up    ``dense``    True         causal attention + dense KL to the attention distribution
sparse training    ``sparse``   True         indexer top-k + sparse attention + KL on the top-k set
sparse inference   ``sparse``   False        indexer top-k + sparse attention (rollouts, evaluation)
=================  ===========  ===========  ============================================================

``module.training`` does not change any of this. Choices that vary from one forward to the next (recall
sampling, recording or replaying top-k indices) are arguments of
:meth:`dsa_dist.model.indexer_loss.IndexerLossTracker.begin_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AttentionKind = Literal["dense", "sparse"]


@dataclass(frozen=True)
class DSARuntime:
    """Per-model runtime choice of the DSA layers (see the module docstring for the four uses)."""

    attention: AttentionKind = "sparse"
    """'dense': causal attention over every earlier key; 'sparse': attention over the indexer's top-k keys."""
    indexer_kl: bool = True
    """Compute the indexer KL (and record it in the tracker): on while the indexer trains, off otherwise."""
    fused_sparse_kl: bool = True
    """Sparse stage with the KL: take the KL's target from the sparse attention's backward
    (:func:`dsa_dist.ops.sparse_attention_with_indexer_kl`; the KL value is then known after the backward)
    instead of recomputing it in a separate op. Applies where grad is enabled and tp == 1; in forward-only
    passes, under TP, or when False, the separate op runs (see :func:`dsa_dist.model.dsa_core.dsa_attention`)."""

    def __post_init__(self) -> None:
        if self.attention not in ("dense", "sparse"):
            raise ValueError(f"DSARuntime.attention must be 'dense' or 'sparse', got {self.attention!r}")
        if not isinstance(self.indexer_kl, bool):
            raise ValueError(f"DSARuntime.indexer_kl must be a bool, got {self.indexer_kl!r}")
        if not isinstance(self.fused_sparse_kl, bool):
            raise ValueError(f"DSARuntime.fused_sparse_kl must be a bool, got {self.fused_sparse_kl!r}")


DENSE = DSARuntime(attention="dense", indexer_kl=False)
"""Dense pre-training: no indexer work at all."""
WARMUP = DSARuntime(attention="dense", indexer_kl=True)
"""Indexer warm-up: dense attention, dense KL."""
SPARSE_TRAIN = DSARuntime(attention="sparse", indexer_kl=True)
"""Sparse training: top-k attention and the sparse KL."""
SPARSE_INFERENCE = DSARuntime(attention="sparse", indexer_kl=False)
"""Sparse inference (rollouts, evaluation): top-k attention, no KL."""
