"""Megatron ``ModuleSpec`` for a DSA transformer layer (docs/design.md §3 ``model/``): our attention as the leaf.

The layer is Megatron's ``TransformerLayer`` with its local backend (``LocalSpecProvider``: column/row-parallel
linears, torch RMSNorm, ``MLP`` with SwiGLU); only ``self_attention`` is ours — :class:`DSAMLASelfAttention` or
:class:`DSAGQASelfAttention`, which receive the :class:`DSAModelConfig`, the :class:`DSARuntime` and the shared
:class:`IndexerLossTracker` through the spec's ``params``. Nothing of Megatron is patched.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from dsa_dist.model.attention import DSAAttentionSubmodules, DSAGQASelfAttention, DSAMLASelfAttention
from dsa_dist.model.config import DSAModelConfig
from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.model.runtime import DSARuntime


def dsa_attention_spec(dsa: DSAModelConfig, runtime: DSARuntime, tracker: IndexerLossTracker | None) -> ModuleSpec:
    """Spec of the DSA self-attention (MLA or GQA by ``dsa.attention``) on Megatron's local backend."""
    backend = LocalSpecProvider()
    module = DSAMLASelfAttention if dsa.attention == "mla" else DSAGQASelfAttention
    return ModuleSpec(
        module=module,
        params={"dsa": dsa, "runtime": runtime, "tracker": tracker},
        submodules=DSAAttentionSubmodules(
            column_parallel_linear=backend.column_parallel_linear(),
            row_parallel_linear=backend.row_parallel_linear(),
            norm=backend.layer_norm(rms_norm=True),
        ),
    )


def dsa_layer_spec(dsa: DSAModelConfig, runtime: DSARuntime, tracker: IndexerLossTracker | None) -> ModuleSpec:
    """Spec of one pre-norm transformer layer: RMSNorm → DSA attention → RMSNorm → SwiGLU MLP."""
    backend = LocalSpecProvider()
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=dsa_attention_spec(dsa, runtime, tracker),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )
