"""Megatron-Core modules for DSA models (DESIGN.md §3 ``model/``).

- :mod:`.config` — ``DSAModelConfig`` (+ ``MLAConfig``, ``GQAConfig``, ``IndexerConfig``) and ``preset(name)``;
- :mod:`.indexer` — ``LightningIndexer``; :mod:`.indexer_loss` — ``IndexerLossTracker``;
- :mod:`.attention` — ``DSAMLASelfAttention`` (absorbed MLA) and ``DSAGQASelfAttention``; :mod:`.dsa_core` — the
  shared top-k / attention / KL with the TP and CP layout; :mod:`.specs` — layer ``ModuleSpec``;
- :mod:`.builder` — ``build_model(cfg)`` → ``GPTModel``, ``get_indexer_loss_tracker(model)``, ``set_dsa_mode``.

Names are imported on first use, so ``dsa_dist.model.config`` is usable without importing Megatron.
"""

from importlib import import_module

_EXPORTS = {
    "DSAModelConfig": "config", "MLAConfig": "config", "GQAConfig": "config", "IndexerConfig": "config",
    "preset": "config", "PRESET_NAMES": "config",
    "LightningIndexer": "indexer", "sync_indexer_grads": "indexer",
    "IndexerLossTracker": "indexer_loss",
    "DSAMLASelfAttention": "attention", "DSAGQASelfAttention": "attention",
    "dsa_layer_spec": "specs", "dsa_attention_spec": "specs",
    "build_model": "builder", "get_indexer_loss_tracker": "builder", "set_dsa_mode": "builder",
    "dsa_attention_layers": "builder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsa_dist.model' has no attribute {name!r}")
    return getattr(import_module(f"dsa_dist.model.{_EXPORTS[name]}"), name)
