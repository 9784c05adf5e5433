"""Megatron-Core modules for DSA models (docs/design.md §3 ``model/``).

- :mod:`.config` — ``DSAModelConfig`` (+ ``MLAConfig``, ``GQAConfig``, ``IndexerConfig``, ``RecomputeConfig``),
  frozen, and ``preset(name)``; :mod:`.runtime` — ``DSARuntime`` (dense|sparse attention, indexer KL on|off);
- :mod:`.indexer` — ``LightningIndexer``, ``is_indexer_parameter``; :mod:`.indexer_loss` — ``IndexerLossTracker``
  (per-forward options via ``begin_forward``; KL, recall and top-k records);
- :mod:`.attention` — ``DSAMLASelfAttention`` (absorbed MLA) and ``DSAGQASelfAttention`` (``project`` /
  ``project_output``); :mod:`.dsa_core` — the DSA steps (select / attend / indexer KL / recall) with the TP and CP
  layout; :mod:`.specs` — layer ``ModuleSpec``;
- :mod:`.builder` — ``build_model(cfg, runtime=...)`` → ``GPTModel``, ``get_indexer_loss_tracker(model)``.

Names are imported on first use, so ``dsa_dist.model.config`` is usable without importing Megatron.
"""

from importlib import import_module

_EXPORTS = {
    "DSAModelConfig": "config", "RecomputeConfig": "config", "MLAConfig": "config", "GQAConfig": "config",
    "IndexerConfig": "config",
    "preset": "config", "PRESET_NAMES": "config",
    "DSARuntime": "runtime",
    "LightningIndexer": "indexer", "sync_indexer_grads": "indexer", "is_indexer_parameter": "indexer",
    "IndexerLossTracker": "indexer_loss",
    "DSAMLASelfAttention": "attention", "DSAGQASelfAttention": "attention",
    "DSAInputs": "dsa_core",
    "dsa_layer_spec": "specs", "dsa_attention_spec": "specs",
    "build_model": "builder", "get_indexer_loss_tracker": "builder", "dsa_attention_layers": "builder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsa_dist.model' has no attribute {name!r}")
    return getattr(import_module(f"dsa_dist.model.{_EXPORTS[name]}"), name)
