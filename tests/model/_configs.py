"""Test helper: a preset with some fields replaced (``dataclasses.replace``; nested sections given as dicts)."""

from __future__ import annotations

from dataclasses import replace

from dsa_dist.model.config import DSAModelConfig, preset


def model_config(name: str, *, indexer: dict | None = None, mla: dict | None = None, gqa: dict | None = None,
                 **fields: object) -> DSAModelConfig:
    """``preset(name)`` with top-level ``fields`` and nested ``indexer`` / ``mla`` / ``gqa`` fields replaced."""
    base = preset(name)
    nested = {key: replace(getattr(base, key), **value)
              for key, value in (("indexer", indexer), ("mla", mla), ("gqa", gqa)) if value}
    return replace(base, **fields, **nested)
