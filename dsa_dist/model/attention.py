"""DSA self-attention layers for Megatron-Core (docs/design.md §1–§2): MLA in absorbed/MQA mode, and GQA.

Both are ``ModuleSpec`` leaves used as a ``TransformerLayer``'s ``self_attention`` (see :mod:`.specs`); they take
Megatron's ``[s, b, hidden]`` activations and return ``(output [s, b, hidden], bias)`` like Megatron's attentions.
Each forward is three parts, all public so that a KV-cache decoder can reuse them without copying code:

- ``project(x, positions) -> DSAInputs`` — ``x`` [b, s, hidden] batch-first, ``positions`` [s] global token
  positions: rope-applied queries, keys (and values), and the indexer's inputs (:class:`~.dsa_core.DSAInputs`);
- the DSA steps of :mod:`.dsa_core` (:func:`~.dsa_core.dsa_attention`: indexer top-k, sparse or dense attention,
  indexer KL) → the core output ``o`` [b, s, H/tp, d_v];
- ``project_output(o) -> (out [b, s, hidden], bias)`` — the output projection (MLA: up-projection ``W_uv`` first).

The indexer is ``self.indexer`` (:class:`~.indexer.LightningIndexer`): ``index_keys(h, positions)`` gives the FP8
keys of an index-key cache, ``index_queries(c_q, h, positions)`` the matching queries (``DSAInputs.indexer_h`` and
``DSAInputs.indexer_cq`` are its inputs). What the steps compute is the layer's
:class:`~.runtime.DSARuntime` (fixed at build) and this forward's options on the shared
:class:`~.indexer_loss.IndexerLossTracker` (``begin_forward``).

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
then shards, initialises and checkpoints it like any column-parallel weight. A decoder caches ``kv`` (the latent,
576 values per token) and passes ``v=None, v_dim=kv_lora``: V is the latent's first kv_lora dims.

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
from dsa_dist.model.dsa_core import DSAInputs, dsa_attention, plan_dsa_attention
from dsa_dist.model.indexer import LightningIndexer
from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.model.runtime import DSARuntime
from dsa_dist.ops import apply_rope
from dsa_dist.parallel.groups import current_parallel_dims
from dsa_dist.parallel.tp import sum_grad_over_tp


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
    """What both attentions share: the indexer, the runtime, the tracker and the Megatron call convention.

    The model config is validated against the layout once, where the ``TransformerConfig`` is made
    (:meth:`DSAModelConfig.to_transformer_config`); here only cheap asserts remain.
    """

    def __init__(self, config: TransformerConfig, dsa: DSAModelConfig, runtime: DSARuntime, layer_number: int,
                 tracker: IndexerLossTracker | None) -> None:
        super().__init__(config=config)
        assert isinstance(runtime, DSARuntime), f"runtime must be a DSARuntime, got {type(runtime).__name__}"
        self.dsa = dsa
        self.runtime = runtime
        self.layer_number = layer_number
        self.tracker = tracker
        self.dims = current_parallel_dims()
        assert dsa.num_heads % self.dims.tp == 0, "DSAModelConfig.validate(tp=...) checks num_heads % tp"
        self.local_heads = dsa.num_heads // self.dims.tp

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> DSAInputs:
        """``x`` [b, s, hidden] at global ``positions`` [s] → the inputs of the DSA steps (see module docstring)."""
        raise NotImplementedError

    def project_output(self, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Core output ``o`` [b, s, H/tp, d_v] → ``(out [b, s, hidden], bias)`` (row-parallel: summed over TP)."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                inference_context: Any = None, packed_seq_params: Any = None, **unused: Any):
        """Megatron's call: ``hidden_states`` [s, b, hidden] (this rank's tokens) → ``(out [s, b, hidden], bias)``."""
        x, positions = self._enter(hidden_states, attention_mask, packed_seq_params, inference_context)
        # Planned before the projections: under CP the index keys' all-gathers start here and overlap them.
        plan = plan_dsa_attention(x, positions, indexer=self.indexer, dsa=self.dsa, runtime=self.runtime,
                                  dims=self.dims, tracker=self.tracker, layer=self.layer_number)
        inputs = self.project(x, positions)
        o = dsa_attention(inputs, indexer=self.indexer, dsa=self.dsa, runtime=self.runtime, dims=self.dims,
                          tracker=self.tracker, layer=self.layer_number, plan=plan)  # [b, s, H/tp, d_v]
        out, bias = self.project_output(o)
        return out.transpose(0, 1).contiguous(), bias

    def _enter(self, hidden_states: torch.Tensor, attention_mask: Any, packed_seq_params: Any,
               inference_context: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Check Megatron's call and return ``(x [b, s, hidden], global positions [s])``."""
        if attention_mask is not None:
            raise ValueError("DSA attention is causal on global token positions and takes no attention_mask; "
                             "pass attention_mask=None to GPTModel.forward")
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by DSA attention (packed_seq_params must be None)")
        if inference_context is not None:
            raise ValueError("Megatron's inference_context is not supported: a KV-cache decoder calls project(), "
                             "the steps of dsa_dist.model.dsa_core and project_output() itself")
        x = hidden_states.transpose(0, 1)  # [b, s, hidden]
        return x, self.dims.local_positions(x.shape[1], x.device)


class DSAMLASelfAttention(_DSAAttentionBase):
    """MLA (absorbed, MQA over one latent KV per token) with DSA; see the module docstring for the math."""

    def __init__(self, config: TransformerConfig, submodules: DSAAttentionSubmodules, layer_number: int,
                 dsa: DSAModelConfig, runtime: DSARuntime, tracker: IndexerLossTracker | None = None,
                 **megatron_kwargs: Any) -> None:
        super().__init__(config, dsa, runtime, layer_number, tracker)
        m = dsa.mla
        self.nope, self.rope, self.v_dim, self.kv_lora = m.qk_nope_dim, m.qk_rope_dim, m.v_head_dim, m.kv_lora_rank
        hidden, heads = config.hidden_size, dsa.num_heads
        self.linear_q_down = _replicated_linear(config, hidden, m.q_lora_rank)
        self.q_norm = build_module(submodules.norm, config=config, hidden_size=m.q_lora_rank, eps=dsa.norm_eps)
        self.linear_q_up = build_module(
            submodules.column_parallel_linear, m.q_lora_rank, heads * (m.qk_nope_dim + m.qk_rope_dim),
            config=config, init_method=config.init_method, bias=False, gather_output=False,
            tp_group=self.dims.tp_group,
        )
        self.linear_kv_down = _replicated_linear(config, hidden, m.kv_lora_rank + m.qk_rope_dim)
        self.kv_norm = build_module(submodules.norm, config=config, hidden_size=m.kv_lora_rank, eps=dsa.norm_eps)
        # Holds W_uk and W_uv ([H, nope + v, kv_lora] head-major); used absorbed, never called as a layer.
        self.linear_kv_up = build_module(
            submodules.column_parallel_linear, m.kv_lora_rank, heads * (m.qk_nope_dim + m.v_head_dim),
            config=config, init_method=config.init_method, bias=False, gather_output=False,
            tp_group=self.dims.tp_group,
        )
        self.linear_proj = build_module(
            submodules.row_parallel_linear, heads * m.v_head_dim, hidden, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            tp_group=self.dims.tp_group,
        )
        self.indexer = LightningIndexer(config, dsa, q_in_dim=m.q_lora_rank)

    def _w_kv_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_uk [H/tp, nope, kv_lora], W_uv [H/tp, v, kv_lora])``: head-major views of ``linear_kv_up``."""
        w_kv = self.linear_kv_up.weight.view(self.local_heads, self.nope + self.v_dim, self.kv_lora)
        w_uk, w_uv = w_kv.split([self.nope, self.v_dim], dim=1)
        return w_uk, w_uv

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> DSAInputs:
        """``x`` [b, s, hidden] at ``positions`` [s] → absorbed queries [b, s, H/tp, kv_lora + rope], the latent KV
        [b, s, 1, kv_lora + rope] (``v=None``: V is its first kv_lora dims) and the indexer inputs ``(x, c_q)``."""
        b, s, _ = x.shape
        # The latent first: under CP its backward waits for the dKV reduce-scatter, and autograd runs the nodes
        # made later (the query path) before it, so the transfer overlaps the query path's backward.
        c_kv, k_rope = self.linear_kv_down(x).split([self.kv_lora, self.rope], dim=-1)
        c_kv = self.kv_norm(c_kv)  # [b, s, kv_lora]
        k_rope = apply_rope(k_rope[:, :, None], positions, self.rope, self.dsa.rope_base)  # [b, s, 1, rope]
        latent = torch.cat([c_kv[:, :, None], k_rope], -1)  # [b, s, 1, kv_lora + rope]
        # This rank's heads give only part of d(latent): sum it over TP in backward (identity forward), so the
        # replicated W_kva / kv_norm see the full gradient on every rank.
        latent = sum_grad_over_tp(latent, self.dims)
        c_q = self.q_norm(self.linear_q_down(x))  # [b, s, q_lora]
        q, _ = self.linear_q_up(c_q)
        q = q.view(b, s, self.local_heads, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        w_uk, _ = self._w_kv_up()
        q_lat = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)  # absorbed: q_nope·k_nope = (q_nope W_uk)·c_kv
        q_abs = torch.cat([q_lat, apply_rope(q_rope, positions, self.rope, self.dsa.rope_base)], -1)
        return DSAInputs(q=q_abs, k=latent, v=None, v_dim=self.kv_lora, indexer_h=x, indexer_cq=c_q,
                         positions=positions)

    def project_output(self, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent output ``o`` [b, s, H/tp, kv_lora] → up-projection ``W_uv`` → ``W_o``: ``(out [b, s, hidden],
        bias)``."""
        b, s = o.shape[:2]
        _, w_uv = self._w_kv_up()
        o = torch.einsum("bshc,hvc->bshv", o, w_uv).reshape(b, s, self.local_heads * self.v_dim)
        return self.linear_proj(o)


class DSAGQASelfAttention(_DSAAttentionBase):
    """Llama-style grouped-query attention with DSA (each KV group's query heads share one top-k set)."""

    def __init__(self, config: TransformerConfig, submodules: DSAAttentionSubmodules, layer_number: int,
                 dsa: DSAModelConfig, runtime: DSARuntime, tracker: IndexerLossTracker | None = None,
                 **megatron_kwargs: Any) -> None:
        super().__init__(config, dsa, runtime, layer_number, tracker)
        g = dsa.gqa
        self.head_dim = g.head_dim
        self.local_kv = g.num_kv_heads // self.dims.tp
        self.group = dsa.num_heads // g.num_kv_heads
        hidden = config.hidden_size
        self.linear_qkv = build_module(
            submodules.column_parallel_linear, hidden, g.num_kv_heads * (self.group + 2) * g.head_dim,
            config=config, init_method=config.init_method, bias=False, gather_output=False,
            tp_group=self.dims.tp_group,
        )
        self.linear_proj = build_module(
            submodules.row_parallel_linear, dsa.num_heads * g.head_dim, hidden, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            tp_group=self.dims.tp_group,
        )
        self.indexer = LightningIndexer(config, dsa, q_in_dim=hidden)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> DSAInputs:
        """``x`` [b, s, hidden] at ``positions`` [s] → q [b, s, H/tp, d], k and v [b, s, Hkv/tp, d] (rope on q and
        k) and the indexer inputs ``(x, x)``."""
        b, s, _ = x.shape
        qkv, _ = self.linear_qkv(x)
        qkv = qkv.view(b, s, self.local_kv, self.group + 2, self.head_dim)  # per KV group: G queries, k, v
        q = qkv[..., : self.group, :].reshape(b, s, self.local_heads, self.head_dim)
        k, v = qkv[..., self.group, :], qkv[..., self.group + 1, :]  # [b, s, Hkv/tp, d]
        q = apply_rope(q, positions, self.head_dim, self.dsa.rope_base)
        k = apply_rope(k, positions, self.head_dim, self.dsa.rope_base)
        return DSAInputs(q=q, k=k, v=v, v_dim=self.head_dim, indexer_h=x, indexer_cq=x, positions=positions)

    def project_output(self, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Core output ``o`` [b, s, H/tp, d] → ``(out [b, s, hidden], bias)``."""
        b, s = o.shape[:2]
        return self.linear_proj(o.reshape(b, s, self.local_heads * self.head_dim))
