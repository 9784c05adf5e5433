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


@pytest.mark.timeout(300)
def test_smoke_runs_the_given_cases_with_recompute(tmp_path):
    # 2 gloo ranks, tiny shapes: every step of a case runs, including the compute-alone step (collectives
    # replaced by local copies), whose kept top-k the recomputed forward replays unchecked.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests._dist import free_port

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "benchmarks/cp_scaling.py", "--smoke", "--recompute", "full", "--out", str(tmp_path), "--tag", "t",
           "--cases", "model:256:2,layer:256:2,model:128:1:none"]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "cp_scaling_t.json").read_text())["results"]
    assert [(r["part"], r["L"], r["cp"], r["recompute"]) for r in rows] == [
        ("model", 256, 2, "full"), ("layer", 256, 2, "none"), ("model", 128, 1, "none")]
    assert all("error" not in r and r["step_s"] > 0 for r in rows)
    assert rows[0]["compute_alone_s"] > 0 and rows[0]["sent_bytes_per_layer"] > 0
