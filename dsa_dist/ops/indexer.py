"""Lightning indexer (docs/design.md, "Lightning indexer"): per-token preparation and the score ``I[t, s]``.

    I[t, s] = k_scale[s] · Σ_h w[t, h] · ReLU(q_I[t, h] · k_I[s])     for key position ≤ query position
    I[t, s] = −inf                                                      otherwise

Layout is batch-first: ``q_index [B, Lq, H_I, d_I]``, ``k_index [B, Lk, d_I]`` (one key per token, shared by all
indexer heads), ``weights [B, Lq, H_I]``, ``k_scale [B, Lk]``. Causality is decided on *global* positions
(``q_positions [Lq]``, ``k_positions [Lk]``), so a context-parallel shard can score its own queries against any
key shard. With FP8 inputs the per-head query scale is folded into ``weights`` (ReLU(a·x) = a·ReLU(x), a > 0)
and the per-key scale is ``k_scale`` — see :func:`prepare_indexer_qk`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsa_dist.ops import dispatch
from dsa_dist.ops._checks import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    check_dim,
    check_positions,
    check_same_device,
    check_tensor,
)
from dsa_dist.ops.rotary import apply_rope, hadamard_transform


@dataclass
class IndexerInputs:
    """What the score needs: q/k (bf16/fp32, or e4m3 with the q scale folded into ``weights``) and k_scale."""

    q_index: torch.Tensor  # [B, Lq, H_I, d_I]
    k_index: torch.Tensor  # [B, Lk, d_I]
    weights: torch.Tensor  # [B, Lq, H_I] fp32
    k_scale: torch.Tensor | None  # [B, Lk] fp32, or None (=1)


def prepare_indexer_qk(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    *,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    rope_dim: int = 64,
    rope_base: float = 10000.0,
    hadamard: bool = False,
    fp8: bool = True,
    ue8m0: bool = False,
) -> IndexerInputs:
    """Rope (first ``rope_dim`` dims, rotate-half), optional Hadamard, optional FP8 with per-vector scales.

    ``q_index`` [B, Lq, H_I, d_I] and ``k_index`` [B, Lk, d_I] are the raw projections (k after its LayerNorm);
    ``weights`` [B, Lq, H_I] already carries ``H_I^-1/2 · d_I^-1/2``. The FP8 quantisation goes through
    :mod:`dsa_dist.ops.dispatch`: the Triton kernel on CUDA (bit-identical to the reference op). The same as
    :func:`prepare_indexer_q` and :func:`prepare_indexer_k` (every step is per vector, so the two sides can be
    prepared apart: context parallelism prepares the keys first, to start their exchange early).
    """
    check_tensor("q_index", q_index, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k_index", k_index, ndim=3, dtypes=FLOAT_DTYPES)
    check_dim("k_index", k_index, 2, q_index.shape[-1], "d_I, as in q_index")
    opts = dict(rope_dim=rope_dim, rope_base=rope_base, hadamard=hadamard, fp8=fp8, ue8m0=ue8m0)
    q, w = prepare_indexer_q(q_index, weights, positions=q_positions, **opts)
    k, k_scale = prepare_indexer_k(k_index, positions=k_positions, **opts)
    return IndexerInputs(q, k, w, k_scale)


def prepare_indexer_q(
    q_index: torch.Tensor,
    weights: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    rope_dim: int = 64,
    rope_base: float = 10000.0,
    hadamard: bool = False,
    fp8: bool = True,
    ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query side of :func:`prepare_indexer_qk`: ``(q [B, Lq, H_I, d_I], weights [B, Lq, H_I] fp32)``; with
    FP8, q is e4m3 and its per-head scale is folded into the weights."""
    check_tensor("q_index", q_index, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("weights", weights, ndim=3, dtypes=FLOAT_DTYPES)
    q, q_scale = _prepare_vectors("q_positions", q_index, positions, rope_dim, rope_base, hadamard, fp8, ue8m0)
    weights = weights.float()
    return (q, weights) if q_scale is None else (q, weights * q_scale.squeeze(-1))  # q_scale [B, Lq, H_I, 1]


def prepare_indexer_k(
    k_index: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    rope_dim: int = 64,
    rope_base: float = 10000.0,
    hadamard: bool = False,
    fp8: bool = True,
    ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The key side of :func:`prepare_indexer_qk`: ``(k [B, Lk, d_I], k_scale [B, Lk] fp32 or None)``; with FP8,
    k is e4m3 with one scale per key, else the float keys and None."""
    check_tensor("k_index", k_index, ndim=3, dtypes=FLOAT_DTYPES)
    k, k_scale = _prepare_vectors("k_positions", k_index, positions, rope_dim, rope_base, hadamard, fp8, ue8m0)
    return k, None if k_scale is None else k_scale.squeeze(-1)  # k_scale [B, Lk, 1]


def _prepare_vectors(pos_name, x, positions, rope_dim, rope_base, hadamard, fp8, ue8m0):
    """The per-vector chain shared by both sides: rope → Hadamard → FP8. ``x`` [B, L, ..., d]; returns
    ``(x, scale [B, L, ..., 1])`` with FP8, else ``(x, None)``."""
    pos = check_positions(pos_name, positions, x.shape[1], x.device)
    if rope_dim:
        x = apply_rope(x, pos, rope_dim, rope_base)
    if hadamard:
        x = hadamard_transform(x)
    if not fp8:
        return x, None
    return dispatch.fp8_block_quant(x, x.shape[-1], ue8m0=ue8m0)


def _check_score_inputs(q_index, k_index, weights, k_scale):
    check_tensor("q_index", q_index, ndim=4, dtypes=FLOAT_DTYPES + FP8_DTYPES)
    check_tensor("k_index", k_index, ndim=3, dtypes=FLOAT_DTYPES + FP8_DTYPES)
    check_tensor("weights", weights, ndim=3, dtypes=FLOAT_DTYPES)
    b, lq, h, d = q_index.shape
    check_dim("k_index", k_index, 0, b, "batch")
    check_dim("k_index", k_index, 2, d, "d_I, as in q_index")
    check_dim("weights", weights, 0, b, "batch")
    check_dim("weights", weights, 1, lq, "query length")
    check_dim("weights", weights, 2, h, "indexer heads")
    if k_scale is not None:
        check_tensor("k_scale", k_scale, ndim=2, dtypes=(torch.float32, torch.float64))
        if k_scale.shape != k_index.shape[:2]:
            raise ValueError(f"k_scale must have shape {tuple(k_index.shape[:2])}, got {tuple(k_scale.shape)}")
    check_same_device(q_index=q_index, k_index=k_index, weights=weights, k_scale=k_scale)


def _scores_block(q, k, w, k_scale, q_pos, k_pos, compute_dtype):
    """Scores of a query block against all keys: [B, c, Lk] in ``compute_dtype`` with causal −inf (``q_pos`` [c]
    shared by the batch, or [B, c] per sequence)."""
    logits = torch.einsum("bqhd,bkd->bqhk", q.to(compute_dtype), k.to(compute_dtype))
    scores = torch.einsum("bqhk,bqh->bqk", torch.relu(logits), w.to(compute_dtype))
    if k_scale is not None:
        scores = scores * k_scale.to(compute_dtype)[:, None, :]
    future = k_pos > q_pos[..., None]  # [c, Lk], or [B, c, Lk] for per-sequence query positions
    return scores.masked_fill(future if future.dim() == 3 else future[None], float("-inf"))


def lightning_indexer_scores(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    *,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full score matrix ``I`` [B, Lq, Lk] (float32; float64 if any input is float64). Differentiable.

    Materialises [B, Lq, H_I, Lk]: use it for small L or one query chunk; :func:`lightning_indexer_topk`
    never holds more than a chunk.
    """
    _check_score_inputs(q_index, k_index, weights, k_scale)
    q_pos = check_positions("q_positions", q_positions, q_index.shape[1], q_index.device)
    k_pos = check_positions("k_positions", k_positions, k_index.shape[1], k_index.device)
    compute = torch.float64 if torch.float64 in (q_index.dtype, k_index.dtype, weights.dtype) else torch.float32
    return _scores_block(q_index, k_index, weights, k_scale, q_pos, k_pos, compute)


def indexer_flops(lq: int, lk: int, heads: int, dim: int, causal: bool = True) -> float:
    """FP8-effective FLOPs of the score: 2·H_I·d_I per (query, key) pair, causal pairs only when causal."""
    pairs = lq * (lk + 1) / 2 if causal and lq == lk else lq * lk
    return 2.0 * heads * dim * pairs


def default_index_weight_scale(heads: int, dim: int) -> float:
    """``H_I^-1/2 · d_I^-1/2``, the factor folded into the per-head weights."""
    return 1.0 / math.sqrt(heads * dim)
