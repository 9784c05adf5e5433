"""benchmarks/train_stages.py end to end on CPU at tiny size (the GPU run is the same code on the small model)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.timeout(300)
def test_train_stages_smoke(tmp_path):
    from benchmarks.train_stages import ROWS, main

    main(["--smoke", "--length", "32", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "train_stages.json").read_text())
    rows = {r["row"]: r for r in result["results"]}
    assert list(rows) == list(ROWS)
    assert all(r["tok_s"] > 0 and r["length"] == 32 for r in rows.values())
    # The baseline is the same model with plain SDPA attention: same first-step LM loss as the dense runtime.
    assert abs(rows["dense"]["lm_loss"] - rows["sdpa_baseline"]["lm_loss"]) < 1e-4, rows
    assert "| sdpa_baseline | 1 | 32 |" in (tmp_path / "train_stages.md").read_text()
