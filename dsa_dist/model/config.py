"""Model configuration for DSA models (docs/design.md §1–§2): a small nested, typed, immutable dataclass.

``DSAModelConfig`` describes the *architecture* only and is frozen (its nested configs too): every layer of a
model shares one instance and nothing may change it after construction. What a forward pass does with it — dense
or sparse attention, whether the indexer KL is computed — is the runtime choice
:class:`dsa_dist.model.runtime.DSARuntime`, passed explicitly to :func:`dsa_dist.model.build_model`.

It is an OmegaConf structured config (plain types, ``Literal`` enums, nested dataclasses, no tensors), embedded by
the training config: ``OmegaConf.structured``, ``merge`` and ``to_object`` work with the frozen dataclasses
(overrides are merged into a copy). In code, derive a variant with ``dataclasses.replace``::

    cfg = replace(preset("tiny"), seq_len=128, indexer=replace(preset("tiny").indexer, topk=8))

:meth:`DSAModelConfig.validate` is the one place for model-vs-layout rules; it raises ``ValueError`` naming the
field path, the bad value and the fix (layers below keep only cheap asserts).
:meth:`DSAModelConfig.to_transformer_config` builds the Megatron-Core ``TransformerConfig`` for a layout.

Presets (:func:`preset`): ``tiny`` / ``tiny-gqa`` (CPU tests), ``small`` / ``small-gqa`` (~200M, one GPU) and
``v32-layer`` (DeepSeek-V3.2 attention shapes: H=128, q_lora 1536, kv_lora 512, rope 64, absorbed d_qk 576,
d_v 512; indexer H_I=64, d_I=128, k=2048).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention shapes (used when ``attention == "mla"``); run in absorbed/MQA mode."""

    q_lora_rank: int = 1536
    """Rank of the query latent c_q = q_norm(W_qa h) (also the indexer's query input)."""
    kv_lora_rank: int = 512
    """Rank of the KV latent c_kv; the absorbed attention works in this space (d_v of the core = this)."""
    qk_rope_dim: int = 64
    """Per-head rotary query/key dims; the rotary key is shared by all heads (absorbed d_qk = kv_lora + this)."""
    qk_nope_dim: int = 128
    """Per-head non-rotary query/key dims (absorbed into the latent through W_uk)."""
    v_head_dim: int = 128
    """Per-head value dims after W_uv (input of the output projection: heads * v_head_dim)."""


@dataclass(frozen=True)
class GQAConfig:
    """Grouped-query attention shapes (used when ``attention == "gqa"``), Llama-style."""

    num_kv_heads: int = 8
    """Key/value heads; each serves num_heads / num_kv_heads query heads and one top-k set."""
    head_dim: int = 128
    """Per-head q/k/v dims."""


@dataclass(frozen=True)
class IndexerConfig:
    """Lightning indexer (docs/design.md#lightning-indexer)."""

    heads: int = 64
    """H_I, indexer heads."""
    head_dim: int = 128
    """d_I, indexer head dim (one FP8 scale per vector of this size)."""
    topk: int = 2048
    """k, keys kept per query in sparse mode (at most seq_len)."""
    rope_dim: int = 64
    """Rotary dims at the start of q_I/k_I (non-interleaved layout); 0 disables rope in the indexer."""
    hadamard: bool = True
    """Rotate q_I/k_I by an orthonormal Hadamard matrix before FP8 (needs a power-of-two head_dim)."""
    fp8: bool = True
    """Quantise q_I/k_I to e4m3 with per-vector scales for scoring (the KL sees the same values, straight-through)."""
    ue8m0: bool = False
    """Round FP8 scales up to powers of two."""
    recall_rows: int = 16
    """Query rows sampled per layer for the 'indexer recall' metric (on forwards that ask for it)."""
    cp_topk_mode: Literal["allgather", "ring", "candidates"] = "allgather"
    """How context-parallel ranks agree on the top-k (dsa_dist.parallel.distributed_indexer_topk); same result.
    'allgather' (default) gathers the FP8 index keys (L·(d_I + 4) bytes per layer) and scores them in one pass: on
    4 H100s it was the faster mode at 32K (0.224 vs 0.265 s per step for the small model) and the one that ran the
    V3.2 layer at 512K; 'ring' overlaps the key exchange with scoring but hung there (docs/context_parallel.md)."""


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recompute through Megatron-Core's own mechanism (``TransformerConfig.recompute_*``).

    ``full`` checkpoints whole transformer layers (only each chunk's input is kept; the layers run again in
    backward), which is what makes long sequences fit (docs/context_parallel.md "Memory per rank"). The DSA
    layers then attach their indexer KL to their output (``IndexerLossTracker(attach_coeff=...)``, set up by
    :func:`dsa_dist.model.build_model`), so the KL's gradient comes from the recomputed forward, exactly once.
    """

    granularity: Literal["none", "full", "selective"] = "none"
    """'none': keep all activations; 'full': recompute whole layers (``method`` / ``num_layers`` say which);
    'selective': recompute only the submodules in ``modules`` (Megatron's 'selective')."""
    method: Literal["uniform", "block"] = "uniform"
    """For 'full': 'uniform' checkpoints every chunk of ``num_layers`` layers; 'block' checkpoints the first
    ``num_layers`` layers (of each pipeline stage) and keeps the activations of the others."""
    num_layers: int = 1
    """For 'full': layers per checkpointed chunk ('uniform') or layers checkpointed ('block'); 1 = least memory."""
    modules: tuple[str, ...] = ("mlp",)
    """For 'selective': Megatron's ``recompute_modules`` that apply to this model: 'mlp' (the SwiGLU MLP).
    Megatron's 'core_attn' does not reach the DSA attention (it is not Megatron's core attention) and its
    'layernorm' needs Transformer Engine."""

    keep_topk: bool = True
    """For 'full' in the sparse stage: keep each layer's top-k indices from the first forward and replay them in
    the recomputed forward, instead of running the indexer's O(L²) scoring again (identical indices). Costs
    L/CP · k · 4 bytes per layer until its backward (small model, 128K tokens per GPU: 256 MiB per layer);
    false trades that memory for the second scoring."""

    @property
    def enabled(self) -> bool:
        """Whether any recompute is on."""
        return self.granularity != "none"

    @property
    def full(self) -> bool:
        """Whether whole layers are recomputed (the DSA layers' KL is then attached to their output)."""
        return self.granularity == "full"


@dataclass(frozen=True)
class DSAModelConfig:
    """A decoder-only LM with DSA attention in every layer."""

    attention: Literal["mla", "gqa"] = "mla"
    """Main attention family: MLA in absorbed/MQA mode (one 576-dim latent KV per token) or Llama-style GQA."""
    vocab_size: int = 32768
    """Vocabulary size (Megatron pads nothing: make it divisible by TP)."""
    num_layers: int = 12
    """Transformer layers."""
    hidden_size: int = 1024
    """Model width."""
    ffn_hidden_size: int = 2816
    """MLP inner width (per SwiGLU branch)."""
    num_heads: int = 16
    """Main attention query heads (split across TP)."""
    seq_len: int = 4096
    """Maximum sequence length (global, before context-parallel sharding)."""
    rope_base: float = 10000.0
    """Rotary base of the main attention and the indexer."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (the indexer's key LayerNorm uses it too)."""
    init_std: float = 0.02
    """Std of the normal weight init."""
    tie_embeddings: bool = False
    """Share input embedding and output layer weights."""
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter/activation dtype (bf16 on GPU; float32 for CPU tests)."""
    indexer_loss_coeff: float = 1.0
    """Weight of the indexer KL in the training loss (the training loop applies it to the tracker total)."""
    mla: MLAConfig = field(default_factory=MLAConfig)
    """MLA shapes (read when attention == 'mla')."""
    gqa: GQAConfig = field(default_factory=GQAConfig)
    """GQA shapes (read when attention == 'gqa')."""
    indexer: IndexerConfig = field(default_factory=IndexerConfig)
    """The lightning indexer of every layer."""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    """Activation recompute (memory for compute; not part of the architecture, results are identical)."""

    # ------------------------------------------------------------------ derived shapes
    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.params_dtype == "bfloat16" else torch.float32

    @property
    def kv_heads(self) -> int:
        """KV heads of the core attention: 1 latent head for MLA (MQA), num_kv_heads for GQA."""
        return 1 if self.attention == "mla" else self.gqa.num_kv_heads

    @property
    def core_qk_dim(self) -> int:
        """d_qk seen by the core attention (MLA absorbed: kv_lora + rope, e.g. 576)."""
        return self.mla.kv_lora_rank + self.mla.qk_rope_dim if self.attention == "mla" else self.gqa.head_dim

    @property
    def core_v_dim(self) -> int:
        """d_v seen by the core attention (MLA absorbed: kv_lora, e.g. 512)."""
        return self.mla.kv_lora_rank if self.attention == "mla" else self.gqa.head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt of the *per-head* q·k dim (MLA: nope + rope — absorption keeps the logits unchanged)."""
        d = self.mla.qk_nope_dim + self.mla.qk_rope_dim if self.attention == "mla" else self.gqa.head_dim
        return d**-0.5

    def num_parameters(self) -> int:
        """Exact parameter count of the model :func:`dsa_dist.model.build_model` builds (TP=1)."""
        h, f, heads = self.hidden_size, self.ffn_hidden_size, self.num_heads
        ix = self.indexer
        if self.attention == "mla":
            m = self.mla
            q_in = m.q_lora_rank
            attn = (h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * (m.qk_nope_dim + m.qk_rope_dim)
                    + h * (m.kv_lora_rank + m.qk_rope_dim) + m.kv_lora_rank
                    + m.kv_lora_rank * heads * (m.qk_nope_dim + m.v_head_dim) + heads * m.v_head_dim * h)
        else:
            g = self.gqa
            q_in = h
            attn = h * (heads + 2 * g.num_kv_heads) * g.head_dim + heads * g.head_dim * h
        indexer = q_in * ix.heads * ix.head_dim + h * ix.head_dim + 2 * ix.head_dim + h * ix.heads
        layer = 2 * h + attn + indexer + h * 2 * f + f * h
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return embeddings + h + self.num_layers * layer

    # ------------------------------------------------------------------ checks
    def validate(self, tp: int = 1, cp: int = 1) -> DSAModelConfig:
        """Raise ``ValueError`` naming the field, the value and the fix; returns self for chaining."""
        _check_literal("attention", self.attention, ("mla", "gqa"))
        _check_literal("params_dtype", self.params_dtype, ("float32", "bfloat16"))
        for name in ("vocab_size", "num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "seq_len"):
            _check_pos(name, getattr(self, name))
        ix = self.indexer
        for name in ("heads", "head_dim", "topk", "recall_rows"):
            _check_pos(f"indexer.{name}", getattr(ix, name))
        _check_literal("indexer.cp_topk_mode", ix.cp_topk_mode, ("allgather", "ring", "candidates"))
        _check_pos("tp", tp)
        _check_pos("cp", cp)
        if self.num_heads % tp:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by tensor-parallel size {tp}; "
                             "choose a TP size that divides the number of heads")
        if self.vocab_size % tp:
            raise ValueError(f"vocab_size={self.vocab_size} is not divisible by tensor-parallel size {tp}; "
                             "pad the vocabulary to a multiple of TP")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by tensor-parallel size {tp}")
        if self.attention == "mla":
            for name in ("q_lora_rank", "kv_lora_rank", "qk_rope_dim", "qk_nope_dim", "v_head_dim"):
                _check_pos(f"mla.{name}", getattr(self.mla, name))
            if self.mla.qk_rope_dim % 2:
                raise ValueError(f"mla.qk_rope_dim={self.mla.qk_rope_dim} must be even (rotate-half rope)")
        else:
            _check_pos("gqa.num_kv_heads", self.gqa.num_kv_heads)
            _check_pos("gqa.head_dim", self.gqa.head_dim)
            if self.num_heads % self.gqa.num_kv_heads:
                raise ValueError(f"num_heads={self.num_heads} must be a multiple of gqa.num_kv_heads="
                                 f"{self.gqa.num_kv_heads}")
            if self.gqa.num_kv_heads % tp:
                raise ValueError(f"gqa.num_kv_heads={self.gqa.num_kv_heads} is not divisible by tensor-parallel "
                                 f"size {tp}; choose a TP size that divides the KV heads")
            if self.gqa.head_dim % 2:
                raise ValueError(f"gqa.head_dim={self.gqa.head_dim} must be even (rotate-half rope)")
        if ix.rope_dim < 0 or ix.rope_dim % 2 or ix.rope_dim > ix.head_dim:
            raise ValueError(f"indexer.rope_dim={ix.rope_dim} must be an even number in [0, indexer.head_dim="
                             f"{ix.head_dim}]")
        if ix.hadamard and ix.head_dim & (ix.head_dim - 1):
            raise ValueError(f"indexer.hadamard needs a power-of-two indexer.head_dim, got {ix.head_dim}; "
                             "change head_dim or set hadamard=false")
        if ix.topk > self.seq_len:
            raise ValueError(f"indexer.topk={ix.topk} is larger than seq_len={self.seq_len}; at most seq_len keys "
                             "exist (the dense attention runtime attends to all of them)")
        _check_recompute(self.recompute, self.num_layers)
        if cp > 1 and self.seq_len % (2 * cp):
            raise ValueError(f"seq_len={self.seq_len} is not divisible by 2*cp={2 * cp} (zigzag context parallel "
                             f"uses 2*cp chunks); pad the sequence to a multiple of {2 * cp} or change cp")
        if (self.seq_len // cp) % tp:
            raise ValueError(f"the per-rank sequence seq_len/cp={self.seq_len // cp} is not divisible by tp={tp} "
                             "(the indexer splits queries across TP ranks); pad the sequence or change tp/cp")
        return self

    # ------------------------------------------------------------------ Megatron
    def to_transformer_config(self, parallel: Any = None):
        """Megatron-Core ``TransformerConfig`` for this model.

        ``parallel``: any object with integer attributes ``tp``, ``cp`` and optionally ``pp`` (the training
        config's parallel section, or :class:`dsa_dist.parallel.ParallelDims`); None reads the sizes from the
        initialised ``parallel_state``. The DSA-specific shapes stay in this dataclass (the attention modules
        receive it through their ``ModuleSpec`` params).
        """
        from megatron.core.transformer.transformer_config import TransformerConfig

        from dsa_dist.parallel.groups import current_parallel_dims

        if parallel is None:
            parallel = current_parallel_dims()
        tp, cp, pp = int(parallel.tp), int(parallel.cp), int(getattr(parallel, "pp", 1))
        self.validate(tp=tp, cp=cp)
        bf16 = self.params_dtype == "bfloat16"
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_heads,
            num_query_groups=self.gqa.num_kv_heads if self.attention == "gqa" else None,
            kv_channels=self.gqa.head_dim if self.attention == "gqa" else self.mla.v_head_dim,
            tensor_model_parallel_size=tp,
            context_parallel_size=cp,
            pipeline_model_parallel_size=pp,
            sequence_parallel=False,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_std,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=self.torch_dtype,
            pipeline_dtype=self.torch_dtype,
            bf16=bf16,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            **_megatron_recompute(self.recompute),
        )


def _check_recompute(rc: RecomputeConfig, num_layers: int) -> None:
    """``recompute.*`` rules (Megatron asserts some of them later, without naming our fields)."""
    _check_literal("recompute.granularity", rc.granularity, ("none", "full", "selective"))
    _check_literal("recompute.method", rc.method, ("uniform", "block"))
    _check_pos("recompute.num_layers", rc.num_layers)
    if rc.granularity == "full" and rc.num_layers > num_layers:
        raise ValueError(f"recompute.num_layers={rc.num_layers} is larger than num_layers={num_layers}; use at most "
                         "the model's layer count (1 recomputes each layer on its own: least memory)")
    if rc.granularity == "selective":
        modules = tuple(rc.modules)
        if not modules:
            raise ValueError("recompute.modules is empty with recompute.granularity='selective'; list 'mlp', or set "
                             "recompute.granularity='none'")
        for name in modules:
            if name != "mlp":
                raise ValueError(f"recompute.modules holds {name!r}; allowed: 'mlp' (Megatron's 'core_attn' does "
                                 "not reach the DSA attention and its 'layernorm' needs Transformer Engine: use "
                                 "recompute.granularity='full' to recompute whole layers)")


def _megatron_recompute(rc: RecomputeConfig) -> dict[str, Any]:
    """The ``TransformerConfig`` recompute fields for ``rc`` (none when recompute is off)."""
    if rc.granularity == "full":
        return {"recompute_granularity": "full", "recompute_method": rc.method,
                "recompute_num_layers": rc.num_layers}
    if rc.granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(rc.modules)}
    return {}


def _check_pos(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_literal(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


_PRESETS: dict[str, DSAModelConfig] = {
    # CPU tests: every dimension tiny, but all code paths on (FP8, Hadamard, rope, MQA latent, GQA groups).
    "tiny": DSAModelConfig(
        attention="mla", vocab_size=128, num_layers=2, hidden_size=64, ffn_hidden_size=96, num_heads=4,
        seq_len=64, mla=MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_rope_dim=8, qk_nope_dim=16, v_head_dim=16),
        indexer=IndexerConfig(heads=4, head_dim=32, topk=16, rope_dim=16, recall_rows=8),
    ),
    "tiny-gqa": DSAModelConfig(
        attention="gqa", vocab_size=128, num_layers=2, hidden_size=64, ffn_hidden_size=96, num_heads=4,
        seq_len=64, gqa=GQAConfig(num_kv_heads=2, head_dim=16),
        indexer=IndexerConfig(heads=4, head_dim=32, topk=16, rope_dim=16, recall_rows=8),
    ),
    # One GPU, ~200M parameters (12 × ~11M + 2 × 33.5M embeddings); indexer ≈ 6% of the absorbed attention FLOPs.
    "small": DSAModelConfig(
        attention="mla", vocab_size=32768, num_layers=12, hidden_size=1024, ffn_hidden_size=2816, num_heads=16,
        seq_len=4096, params_dtype="bfloat16",
        mla=MLAConfig(q_lora_rank=384, kv_lora_rank=256, qk_rope_dim=32, qk_nope_dim=64, v_head_dim=64),
        indexer=IndexerConfig(heads=8, head_dim=64, topk=512, rope_dim=32),
    ),
    "small-gqa": DSAModelConfig(
        attention="gqa", vocab_size=32768, num_layers=12, hidden_size=1024, ffn_hidden_size=2816, num_heads=16,
        seq_len=4096, params_dtype="bfloat16", gqa=GQAConfig(num_kv_heads=4, head_dim=64),
        indexer=IndexerConfig(heads=8, head_dim=64, topk=512, rope_dim=32),
    ),
    # DeepSeek-V3.2 attention shapes, one layer (benchmarks).
    "v32-layer": DSAModelConfig(
        attention="mla", vocab_size=129280, num_layers=1, hidden_size=7168,
        ffn_hidden_size=18432, num_heads=128, seq_len=131072, params_dtype="bfloat16",
        mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_rope_dim=64, qk_nope_dim=128, v_head_dim=128),
        indexer=IndexerConfig(heads=64, head_dim=128, topk=2048, rope_dim=64),
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> DSAModelConfig:
    """The preset ``name`` (immutable: derive variants with ``dataclasses.replace`` or OmegaConf overrides)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {PRESET_NAMES}")
    return _PRESETS[name]
