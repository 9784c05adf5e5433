"""``benchmarks/cp_scaling.py --cases``: the entries parse into exactly the cases given, bad ones are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.cp_scaling_plan import parse_cases, select_cases, shorter, skip_reason, steps_per_case


def test_cases_run_exactly_as_given():
    args = SimpleNamespace(cases=["model:524288:4,layer:524288:4", "model:131072:1:none", "dense_model:131072:4"],
                           recompute="full", mode="ring")
    got = [(c["part"], c["L"], c["cp"], c["recompute"]) for c in select_cases(args, 4)]
    assert got == [("model", 524288, 4, "full"), ("layer", 524288, 4, "none"), ("model", 131072, 1, "none"),
                   ("dense_model", 131072, 4, "full")]


def test_a_case_can_carry_its_own_topk_mode():
    args = SimpleNamespace(cases=["layer:524288:4:none:ring,layer:524288:4"], recompute="none", mode="allgather")
    assert [c["mode"] for c in select_cases(args, 4)] == ["ring", "allgather"]


def _args(**kw):
    base = dict(budget_s=500.0, mem_gib=76.0, reps=1, overlap=True, overlap_steps=1, smoke=False,
                guess_tflops=150.0, guess_dense_tflops=46.0)
    return SimpleNamespace(**{**base, **kw})


def test_the_1m_model_is_predicted_from_the_measured_512k_row_of_an_earlier_run():
    # The measured row (benchmarks/results/cp_scaling_h100x4_long.json): 512K, CP=4, ring, full recompute.
    measured = {"part": "model", "L": 524288, "cp": 4, "mode": "ring", "batch": 1, "recompute": "full",
                "step_s": 10.48, "peak_gib": 33.6, "prior": "long.json"}
    other = dict(measured, recompute="none", peak_gib=134.0)  # another recompute setting: not a twin
    key = ("model", 4, "allgather", 1, "full")
    last = shorter({}, key, 1048576, [measured, other])
    assert last is measured
    case = {"part": "model", "L": 1048576, "cp": 4}
    assert skip_reason(case, None, last, 100.0, _args()) is None           # 67.2 GiB fits 76
    reason = skip_reason(case, None, last, 100.0, _args(mem_gib=60.0))
    assert reason == "skipped: predicted 67 GiB > 60 from 512K in long.json"
    reason = skip_reason(case, None, last, 100.0, _args(budget_s=150.0))   # 21 s/step x 4 steps > 50 s left
    assert reason.startswith("skipped: budget (21.0 s/step predicted from 512K in long.json")
    # a row of this run wins over the earlier runs'
    this_run = dict(measured, mode="allgather", L=262144, peak_gib=17.0)
    assert shorter({(key, 262144): this_run}, key, 1048576, [measured]) is this_run


def test_steps_per_case_follow_what_measure_runs():
    # --overlap: warm-up + first timing (+ reps when a step is short) + the profiled steps
    assert steps_per_case(_args(reps=2), 0.5) == 5 and steps_per_case(_args(reps=2), 21.0) == 3
    assert steps_per_case(_args(reps=2, overlap_steps=2), None) == 6
    assert steps_per_case(_args(reps=2, overlap=False), 21.0) == 8  # + byte count, compute alone, replay


@pytest.mark.parametrize("spec,match", [
    ("model:1024", "bad entry"),
    ("attention:1024:2", "bad entry"),
    ("model:1024:3", "must divide the world size"),
    ("model:1026:4", "multiple of 2\\*CP"),
    ("layer:1024:2:full", "only for model parts"),
    ("model:1024:2:some", "'full' or 'none'"),
    ("layer:1024:2:none:fast", "the top-k mode"),
    ("layer:1024:2:none:ring:x", "bad entry"),
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
           "--cases", "model:256:2,layer:256:2,model:128:1:none,attn_layer:256:2"]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "cp_scaling_t.json").read_text())["results"]
    assert [(r["part"], r["L"], r["cp"], r["recompute"]) for r in rows] == [
        ("model", 256, 2, "full"), ("layer", 256, 2, "none"), ("model", 128, 1, "none"), ("attn_layer", 256, 2, "none")]
    assert all("error" not in r and r["step_s"] > 0 for r in rows)
    # The whole attention layer moves what its DSA core moves (the projections are local), and counts their FLOPs.
    assert rows[3]["sent_bytes_per_layer"] == rows[3]["arith_bytes_per_layer"] == rows[1]["arith_bytes_per_layer"]
    assert rows[3]["flops"] > rows[1]["flops"]
    assert rows[0]["compute_alone_s"] > 0 and rows[0]["sent_bytes_per_layer"] > 0


@pytest.mark.timeout(300)
def test_smoke_overlap_timeline_hang_dump_and_prior(tmp_path):
    # 2 gloo ranks: --overlap runs the profiled step (no device events on CPU: reported, not raised), writes the
    # traces asked for, a case's own top-k mode wins over --mode, the hang dump (armed with a limit every case
    # exceeds) writes both ranks' stacks and the run goes on, and a case predicted from --prior to exceed the
    # memory is skipped with the reason. (Cancelling in time: tests/parallel/test_hang_dump.py.)
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.comm_overlap import NO_DEVICE_EVENTS
    from tests._dist import free_port

    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"results": [{"part": "model", "L": 256, "cp": 2, "mode": "ring", "batch": 1,
                                              "recompute": "none", "step_s": 0.1, "peak_gib": 40.0}]}))
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "benchmarks/cp_scaling.py", "--smoke", "--mode", "allgather", "--overlap", "--overlap-trace", "layer:256:2",
           "--hang-dump-s", "0.01", "--pg-timeout-s", "150", "--prior", str(prior), "--out", str(tmp_path),
           "--tag", "o", "--cases", "layer:256:2:none:ring,model:512:2:none"]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "cp_scaling_o.json").read_text())["results"]
    layer, model = rows
    assert layer["mode"] == "ring" and layer["step_s"] > 0 and layer["sent_bytes_per_layer"] > 0
    assert layer["overlap"]["note"] == NO_DEVICE_EVENTS and len(layer["overlap"]["per_rank"]) == 2
    assert "compute_alone_s" not in layer  # the timeline replaces the compute-alone run
    assert model["error"] == "skipped: predicted 80 GiB > 76 from 0.25K in prior.json"
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == [
        "o_layer_256_2_none_ring_rank0.json.gz", "o_layer_256_2_none_ring_rank1.json.gz"]
    for rank in (0, 1):
        assert f"armed 0.01 s: rank {rank} case layer:256:2:none:ring" in out.stderr
    assert out.stderr.count("cp_scaling.py\", line") >= 2  # each rank's stack, pointing into the benchmark
    assert "no device events" in (tmp_path / "cp_scaling_o.md").read_text()
