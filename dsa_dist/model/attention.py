"""DSA self-attention layers for Megatron-Core (DESIGN.md §1–§2): MLA in absorbed/MQA mode, and GQA.

Both are ``ModuleSpec`` leaves used as a ``TransformerLayer``'s ``self_attention`` (see :mod:`.specs`); they take
Megatron's ``[s, b, hidden]`` activations, work batch-first ``[b, s, heads, dim]`` inside (the layout of
:mod:`dsa_dist.ops`) and return ``(output [s, b, hidden], bias)`` like Megatron's attentions. The DSA part —
indexer, top-k, dense/sparse attention, KL — is :func:`dsa_dist.model.dsa_core.dsa_core`.

**MLA, absorbed** (V3.2: H=128, q_lora 1536, kv_lora 512, rope 64, nope 128, v 128):

    c_q   = q_norm(W_qa h)                       [b, s, q_lora]   (replicated over TP; also the indexer's input)
    q     = W_qb c_q → (q_nope, q_rope)          [b, s, H/tp, nope + rope]
    c_kv, k_rope = split(W_kva h);  c_kv = kv_norm(c_kv)
    q_abs = [q_nope · W_uk[h]  ,  rope(q_rope)]  [b, s, H/tp, kv_lora + rope]  (576: absorbed through W_uk)
    kv    = [c_kv, rope(k_rope)]                 [b, s, 1, kv_lora + rope]   (one latent KV per token, MQA)
    o_lat = Attn(q_abs, kv, v = c_kv)            [b, s, H/tp, kv_lora]
    out   = W_o (o_lat · W_uv[h]ᵀ)               [b, s, hidden]

with softmax scale (nope + rope)^-1/2, so the logits equal those of the non-absorbed MLA. ``W_uk``/``W_uv`` are the
head-major halves of one ``ColumnParallelLinear`` (kv_lora → H·(nope + v)) whose weight is used directly: Megatron
then shards, initialises and checkpoints it like any column-parallel weight.

**GQA** (Llama-style): one column-parallel ``W_qkv`` laid out per KV group ``[Hkv, G + 2, d]`` (G query heads, one
key, one value), rope on the whole head dim; the indexer's query input is ``h`` itself.

Rotary embeddings use global positions (zigzag under CP), computed here; Megatron's rotary is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from dsa_dist.model.config import DSAModelConfig
from dsa_dist.model.dsa_core import ParallelGroups, dsa_core, local_positions, sum_grad_over_tp
from dsa_dist.model.indexer import LightningIndexer
from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.ops import apply_rope


@dataclass
class DSAAttentionSubmodules:
    """Megatron building blocks of a DSA attention (filled by :mod:`.specs` from Megatron's local backend)."""

    column_parallel_linear: ModuleSpec | type | None = None
    row_parallel_linear: ModuleSpec | type | None = None
    norm: ModuleSpec | type | None = None
    """RMSNorm for the MLA query/KV latents (unused by GQA)."""


def _replicated_linear(config: TransformerConfig, d_in: int, d_out: int) -> torch.nn.Linear:
    """A projection replicated on every TP rank (its input gradient is complete on every rank)."""
    lin = torch.nn.Linear(d_in, d_out, bias=False, dtype=config.params_dtype)
    with torch.no_grad():
        config.init_method(lin.weight)
    return lin


class _DSAAttentionBase(MegatronModule):
    """What both attentions share: the indexer, the tracker, positions and the Megatron call convention."""

    def __init__(self, config: TransformerConfig, dsa: DSAModelConfig, layer_number: int,
                 tracker: IndexerLossTracker | None) -> None:
        super().__init__(config=config)
        self.dsa = dsa
        self.layer_number = layer_number
        self.tracker = tracker
        self.groups = ParallelGroups.from_megatron()
        dsa.validate(tp=self.groups.tp_size, cp=self.groups.cp_size)
        if dsa.num_heads % self.groups.tp_size:
            raise ValueError(f"num_heads={dsa.num_heads} is not divisible by tp={self.groups.tp_size}")
        self.local_heads = dsa.num_heads // self.groups.tp_size

    def _enter(self, hidden_states: torch.Tensor, attention_mask: Any, packed_seq_params: Any,
               inference_context: Any) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        """Check Megatron's call and return ``(x [b, s, hidden], b, s, global positions [s])``."""
        if attention_mask is not None:
            raise ValueError("DSA attention is causal on global token positions and takes no attention_mask; "
                             "pass attention_mask=None to GPTModel.forward")
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by DSA attention (packed_seq_params must be None)")
        if inference_context is not None:
            raise ValueError("Megatron's inference_context is not supported: DSA decoding over a KV cache is not "
                             "built yet")
        x = hidden_states.transpose(0, 1)  # [b, s, hidden]
        b, s, _ = x.shape
        return x, b, s, local_positions(s, self.groups, x.device)

    def _core(self, q, k, v, *, v_dim, indexer_h, indexer_cq, positions) -> torch.Tensor:
        return dsa_core(
            q, k, v, v_dim=v_dim, indexer=self.indexer, indexer_h=indexer_h, indexer_cq=indexer_cq,
            positions=positions, dsa=self.dsa, groups=self.groups, softmax_scale=self.dsa.softmax_scale,
            tracker=self.tracker, layer=self.layer_number,
            compute_kl=self.training and self.tracker is not None and self.tracker.compute_kl,
        )


class DSAMLASelfAttention(_DSAAttentionBase):
    """MLA (absorbed, MQA over one latent KV per token) with DSA; see the module docstring for the math."""

    def __init__(self, config: TransformerConfig, submodules: DSAAttentionSubmodules, layer_number: int,
                 dsa: DSAModelConfig, tracker: IndexerLossTracker | None = None, **megatron_kwargs: Any) -> None:
        super().__init__(config, dsa, layer_number, tracker)
        m = dsa.mla
        self.nope, self.rope, self.v_dim, self.kv_lora = m.qk_nope_dim, m.qk_rope_dim, m.v_head_dim, m.kv_lora_rank
        hidden, heads = config.hidden_size, dsa.num_heads
        self.linear_q_down = _replicated_linear(config, hidden, m.q_lora_rank)
        self.q_norm = build_module(submodules.norm, config=config, hidden_size=m.q_lora_rank, eps=dsa.norm_eps)
        self.linear_q_up = build_module(
            submodules.column_parallel_linear, m.q_lora_rank, heads * (m.qk_nope_dim + m.qk_rope_dim),
            config=config, init_method=config.init_method, bias=False, gather_output=False,
            tp_group=self.groups.tp_group,
        )
        self.linear_kv_down = _replicated_linear(config, hidden, m.kv_lora_rank + m.qk_rope_dim)
        self.kv_norm = build_module(submodules.norm, config=config, hidden_size=m.kv_lora_rank, eps=dsa.norm_eps)
        # Holds W_uk and W_uv ([H, nope + v, kv_lora] head-major); used absorbed, never called as a layer.
        self.linear_kv_up = build_module(
            submodules.column_parallel_linear, m.kv_lora_rank, heads * (m.qk_nope_dim + m.v_head_dim),
            config=config, init_method=config.init_method, bias=False, gather_output=False,
            tp_group=self.groups.tp_group,
        )
        self.linear_proj = build_module(
            submodules.row_parallel_linear, heads * m.v_head_dim, hidden, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            tp_group=self.groups.tp_group,
        )
        self.indexer = LightningIndexer(config, dsa, q_in_dim=m.q_lora_rank)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                inference_context: Any = None, packed_seq_params: Any = None, **unused: Any):
        x, b, s, positions = self._enter(hidden_states, attention_mask, packed_seq_params, inference_context)
        c_q = self.q_norm(self.linear_q_down(x))  # [b, s, q_lora]
        q, _ = self.linear_q_up(c_q)
        q = q.view(b, s, self.local_heads, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.linear_kv_down(x).split([self.kv_lora, self.rope], dim=-1)
        c_kv = self.kv_norm(c_kv)  # [b, s, kv_lora]
        w_kv = self.linear_kv_up.weight.view(self.local_heads, self.nope + self.v_dim, self.kv_lora)
        w_uk, w_uv = w_kv.split([self.nope, self.v_dim], dim=1)  # [H/tp, nope, kv_lora], [H/tp, v, kv_lora]
        q_lat = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)  # absorbed: q_nope·k_nope = (q_nope W_uk)·c_kv
        q_abs = torch.cat([q_lat, apply_rope(q_rope, positions, self.rope, self.dsa.rope_base)], -1)
        k_rope = apply_rope(k_rope[:, :, None], positions, self.rope, self.dsa.rope_base)  # [b, s, 1, rope]
        latent = torch.cat([c_kv[:, :, None], k_rope], -1)  # [b, s, 1, kv_lora + rope]
        # This rank's heads give only part of d(latent): sum it over TP in backward (identity forward), so the
        # replicated W_kva / kv_norm see the full gradient on every rank.
        latent = sum_grad_over_tp(latent, self.groups)
        o_lat = self._core(q_abs, latent, None, v_dim=self.kv_lora, indexer_h=x, indexer_cq=c_q,
                           positions=positions)  # [b, s, H/tp, kv_lora]
        o = torch.einsum("bshc,hvc->bshv", o_lat, w_uv).reshape(b, s, self.local_heads * self.v_dim)
        out, bias = self.linear_proj(o)
        return out.transpose(0, 1).contiguous(), bias


class DSAGQASelfAttention(_DSAAttentionBase):
    """Llama-style grouped-query attention with DSA (each KV group's query heads share one top-k set)."""

    def __init__(self, config: TransformerConfig, submodules: DSAAttentionSubmodules, layer_number: int,
                 dsa: DSAModelConfig, tracker: IndexerLossTracker | None = None, **megatron_kwargs: Any) -> None:
        super().__init__(config, dsa, layer_number, tracker)
        g = dsa.gqa
        self.head_dim = g.head_dim
        self.local_kv = g.num_kv_heads // self.groups.tp_size
        self.group = dsa.num_heads // g.num_kv_heads
        hidden = config.hidden_size
        self.linear_qkv = build_module(
            submodules.column_parallel_linear, hidden, g.num_kv_heads * (self.group + 2) * g.head_dim,
            config=config, init_method=config.init_method, bias=False, gather_output=False,
            tp_group=self.groups.tp_group,
        )
        self.linear_proj = build_module(
            submodules.row_parallel_linear, dsa.num_heads * g.head_dim, hidden, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            tp_group=self.groups.tp_group,
        )
        self.indexer = LightningIndexer(config, dsa, q_in_dim=hidden)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                inference_context: Any = None, packed_seq_params: Any = None, **unused: Any):
        x, b, s, positions = self._enter(hidden_states, attention_mask, packed_seq_params, inference_context)
        qkv, _ = self.linear_qkv(x)
        qkv = qkv.view(b, s, self.local_kv, self.group + 2, self.head_dim)  # per KV group: G queries, k, v
        q = qkv[..., : self.group, :].reshape(b, s, self.local_heads, self.head_dim)
        k, v = qkv[..., self.group, :], qkv[..., self.group + 1, :]  # [b, s, Hkv/tp, d]
        q = apply_rope(q, positions, self.head_dim, self.dsa.rope_base)
        k = apply_rope(k, positions, self.head_dim, self.dsa.rope_base)
        o = self._core(q, k, v, v_dim=None, indexer_h=x, indexer_cq=x, positions=positions)  # [b, s, H/tp, d]
        out, bias = self.linear_proj(o.reshape(b, s, self.local_heads * self.head_dim))
        return out.transpose(0, 1).contiguous(), bias
