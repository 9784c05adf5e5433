"""``benchmarks/cp_scaling.py --cases``: the entries parse into exactly the cases given, bad ones are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.cp_scaling_plan import parse_cases, select_cases


def test_cases_run_exactly_as_given():
    args = SimpleNamespace(cases=["model:524288:4,layer:524288:4", "model:131072:1:none", "dense_model:131072:4"],
                           recompute="full", mode="ring")
    got = [(c["part"], c["L"], c["cp"], c["recompute"]) for c in select_cases(args, 4)]
    assert got == [("model", 524288, 4, "full"), ("layer", 524288, 4, "none"), ("model", 131072, 1, "none"),
                   ("dense_model", 131072, 4, "full")]


@pytest.mark.parametrize("spec,match", [
    ("model:1024", "bad entry"),
    ("attention:1024:2", "bad entry"),
    ("model:1024:3", "must divide the world size"),
    ("model:1026:4", "multiple of 2\\*CP"),
    ("layer:1024:2:full", "only for model parts"),
    ("model:1024:2:some", "'full' or 'none'"),
])
def test_bad_case_is_refused(spec, match):
    with pytest.raises(SystemExit, match=match):
        parse_cases([spec], 4, "none")
