"""The lightning indexer as a Megatron module (docs/design.md §1): its own projections, rope, Hadamard and FP8.

    q_I[t] = W_qI c_q[t]  → [H_I, d_I]    (c_q: MLA query latent q_norm(W_qa h); GQA: h)
    k_I[s] = LayerNorm(W_kI h_s) → [d_I]  (one key per token, shared by all indexer heads)
    w[t]   = W_w h_t · (H_I·d_I)^-1/2     → [H_I]

This module only projects and prepares; scoring, top-k and the KL run in :mod:`dsa_dist.model.dsa_core`, which
also decides how the work is split over TP and CP ranks. For decoding over a cache,
:meth:`LightningIndexer.index_keys` gives the scoring-ready (FP8) keys of tokens at given positions — what an
FP8 index-key cache stores — and :meth:`LightningIndexer.index_queries` the matching queries and weights.

Every parameter of the indexer carries ``dsa_indexer = True`` (set at construction):
:func:`is_indexer_parameter` selects them without matching parameter names.

Tensor parallelism — the indexer's parameters are replicated on every TP rank, and each TP rank scores a
disjoint strided subset of the query rows (rows ``r::tp``, balanced under causality) and the top-k indices are
all-gathered, rather than every rank scoring every row. Measured with ``python -m tests.model.bench_tp_indexer``
(2 gloo ranks, 1 thread each, reference ops, L=4096, H_I=16, d_I=64, k=512, FP8; shared 2-core machine):
replicated 8.1 s vs split 4.1 s (a noisier run under load: 8.6 vs 7.0 s), identical indices, the same peak
memory (~0.4 GB/rank: the chunked score block; neither holds [L, L]). At 128K with V3.2 shapes the score is
2·64·128·L²/2 ≈ 1.4e14 FLOP per layer (~200 ms at 700 TFLOPS): replicated, every TP rank pays all of it; split
over tp=8 each pays 1/8 and all-gathers 7/8 of the [L, k] int32 indices (0.9 GiB, a few ms over NVLink) — which
every rank needs anyway for its heads' sparse attention, so the peak memory is the same [L, k] index tensor
either way. The KL target needs the attention probabilities of *all* heads, which TP splits, so the KL is
computed on the same query subset after an all-to-all of the (detached) queries and log-sum-exps from head-split
to row-split — a replicated indexer could not avoid that exchange either. Because each rank's KL covers only its
rows, the indexer parameters carry ``average_gradients_across_tp_domain = True``: Megatron's
``finalize_model_grads`` averages them over TP (:func:`sync_indexer_grads` does the same without Megatron's DDP),
which equals the gradient of the mean KL.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from dsa_dist.model.config import DSAModelConfig
from dsa_dist.ops import (
    IndexerInputs,
    fp8_fake_quant,
    prepare_indexer_k,
    prepare_indexer_q,
)

# Attribute read by Megatron's finalize_model_grads (_allreduce_non_tensor_model_parallel_grads): AVG over TP.
TP_AVG_ATTR = "average_gradients_across_tp_domain"
# Attribute set on every indexer parameter at construction (read by is_indexer_parameter).
INDEXER_PARAM_ATTR = "dsa_indexer"


def is_indexer_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` belongs to a :class:`LightningIndexer` (marked at construction, survives dtype casts)."""
    return bool(getattr(param, INDEXER_PARAM_ATTR, False))


class LightningIndexer(MegatronModule):
    """Indexer projections (replicated over TP) and their preparation for scoring and for the KL.

    Args:
        config: Megatron ``TransformerConfig`` (hidden size, init, eps).
        dsa: the model config (``dsa.indexer`` shapes and options, ``dsa.rope_base``).
        q_in_dim: width of the query input ``c_q`` (MLA: q_lora_rank; GQA: hidden size).
    """

    def __init__(self, config: TransformerConfig, dsa: DSAModelConfig, q_in_dim: int) -> None:
        super().__init__(config=config)
        ix = dsa.indexer
        self.heads, self.head_dim = ix.heads, ix.head_dim
        self.rope_dim, self.rope_base = ix.rope_dim, dsa.rope_base
        self.hadamard, self.fp8, self.ue8m0 = ix.hadamard, ix.fp8, ix.ue8m0
        self.weight_scale = (ix.heads * ix.head_dim) ** -0.5
        dtype = config.params_dtype
        self.wq = torch.nn.Linear(q_in_dim, ix.heads * ix.head_dim, bias=False, dtype=dtype)
        self.wk = torch.nn.Linear(config.hidden_size, ix.head_dim, bias=False, dtype=dtype)
        self.k_norm = torch.nn.LayerNorm(ix.head_dim, eps=config.layernorm_epsilon, dtype=dtype)
        self.ww = torch.nn.Linear(config.hidden_size, ix.heads, bias=False, dtype=dtype)
        with torch.no_grad():
            for lin in (self.wq, self.wk, self.ww):
                config.init_method(lin.weight)
        for p in self.parameters():
            setattr(p, TP_AVG_ATTR, True)
            setattr(p, INDEXER_PARAM_ATTR, True)

    def project_queries(self, c_q: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``c_q`` [B, Lq, q_in], ``h`` [B, Lq, hidden] → (q_I [B, Lq, H_I, d_I], w [B, Lq, H_I] scaled)."""
        q = self.wq(c_q).unflatten(-1, (self.heads, self.head_dim))
        w = self.ww(h) * self.weight_scale
        return q, w

    def project_keys(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` [B, L, hidden] → k_I [B, L, d_I] (after the key LayerNorm)."""
        return self.k_norm(self.wk(h))

    @torch.no_grad()
    def index_keys(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scoring-ready keys of tokens ``h`` [B, L, hidden] at global ``positions`` [L] (an index-key cache entry).

        Returns ``(k_index [B, L, d_I], k_scale [B, L] fp32)``: e4m3 keys with one scale per key when FP8 is on,
        else the float keys and ``None``. Bit-identical to the keys :meth:`prepare_for_topk` scores.
        """
        return self.prepare_keys_for_topk(self.project_keys(h), positions)

    @torch.no_grad()
    def index_queries(self, c_q: torch.Tensor, h: torch.Tensor, positions: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring-ready queries of tokens at global ``positions`` [Lq]: ``(q_index [B, Lq, H_I, d_I], weights
        [B, Lq, H_I] fp32)`` (FP8 query scales folded into the weights), as :meth:`prepare_for_topk` makes them.

        Score them against cached :meth:`index_keys` with ``dsa_dist.ops.dispatch.lightning_indexer_topk``.
        """
        return self.prepare_queries_for_topk(*self.project_queries(c_q, h), positions)

    def _prep(self, fp8: bool) -> dict:
        return dict(rope_dim=self.rope_dim, rope_base=self.rope_base, hadamard=self.hadamard, fp8=fp8,
                    ue8m0=self.ue8m0)

    def prepare_for_topk(self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, *, q_positions: torch.Tensor,
                         k_positions: torch.Tensor) -> IndexerInputs:
        """Rope + Hadamard + FP8 (when enabled) for scoring; no gradient (top-k is not differentiable)."""
        q_index, weights = self.prepare_queries_for_topk(q, w, q_positions)
        k_index, k_scale = self.prepare_keys_for_topk(k, k_positions)
        return IndexerInputs(q_index, k_index, weights, k_scale)

    @torch.no_grad()
    def prepare_queries_for_topk(self, q: torch.Tensor, w: torch.Tensor, positions: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query side of :meth:`prepare_for_topk`: ``(q_index, weights fp32)``."""
        return prepare_indexer_q(q, w, positions=positions, **self._prep(self.fp8))

    @torch.no_grad()
    def prepare_keys_for_topk(self, k: torch.Tensor, positions: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The key side of :meth:`prepare_for_topk`: ``(k_index, k_scale or None)``."""
        return prepare_indexer_k(k, positions=positions, **self._prep(self.fp8))

    def prepare_for_kl(self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, *, q_positions: torch.Tensor,
                       k_positions: torch.Tensor) -> IndexerInputs:
        """Differentiable counterpart of :meth:`prepare_for_topk`: with FP8, q/k are fake-quantised with the
        same per-vector scales (straight-through gradient), so the KL sees the scores the top-k ranked."""
        q_index, weights = self.prepare_queries_for_kl(q, w, q_positions)
        return IndexerInputs(q_index, self.prepare_keys_for_kl(k, k_positions), weights, None)

    def prepare_queries_for_kl(self, q: torch.Tensor, w: torch.Tensor, positions: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query side of :meth:`prepare_for_kl`: ``(q_index, weights fp32)``, differentiable."""
        q_index, weights = prepare_indexer_q(q, w, positions=positions, **self._prep(False))
        return (fp8_fake_quant(q_index, self.head_dim, ue8m0=self.ue8m0) if self.fp8 else q_index), weights

    def prepare_keys_for_kl(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The key side of :meth:`prepare_for_kl`: ``k_index`` [B, L, d_I] float, differentiable."""
        k_index, _ = prepare_indexer_k(k, positions=positions, **self._prep(False))
        return fp8_fake_quant(k_index, self.head_dim, ue8m0=self.ue8m0) if self.fp8 else k_index


def sync_indexer_grads(model: torch.nn.Module, group=None) -> None:
    """Average ``.grad`` of TP-replicated parameters marked ``average_gradients_across_tp_domain`` over TP.

    For training without Megatron's DDP wrapper (tests, simple loops); with DDP, Megatron's
    ``finalize_model_grads`` does this. Averaging already-equal gradients is harmless, so calling both is safe.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = group if group is not None else ps.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return
    grads = [p.grad for p in model.parameters() if getattr(p, TP_AVG_ATTR, False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
