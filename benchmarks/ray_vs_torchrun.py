"""Tokens/s of one job launched through Ray (``python -m launch``) and through ``torchrun``, on one multi-GPU machine.

The small model (configs/single_gpu.yaml), sparse stage only, a few steps, at CP=2 and CP=4 (dp=1, so both
launchers run the same layout: ``world size = cp``). Ray starts a local cluster without the dashboard (a bare
``ray`` install is enough). Tokens/s is the mean of the logged windows after the first (the first holds Triton
compilation and autotuning). Results go to ``<out>/ray_vs_torchrun.json`` and a table on stdout.

    python benchmarks/ray_vs_torchrun.py --out $OUT            # ~5 minutes on 4 H100s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def job_overrides(run_dir: Path, steps: int) -> list[str]:
    return [f"run_dir={run_dir}", "pipeline=[sparse]", f"stages.sparse.steps={steps}", "optim.warmup_steps=2",
            "train.global_batch_size=8", "train.eval_interval=0", "data.eval_tasks=[]", "data.task_fraction=0",
            "logging.log_interval=5", "logging.progress=none", "checkpoint.interval=0", "checkpoint.resume=false"]


def command(launcher: str, cp: int, run_dir: Path, steps: int, extra: list[str]) -> list[str]:
    args = ["configs/single_gpu.yaml", *job_overrides(run_dir, steps), f"parallel.cp={cp}"]
    if launcher == "ray":
        return [sys.executable, "-m", "launch", *args, "cluster.address=local", "cluster.include_dashboard=false",
                "cluster.cpus_per_worker=2", "cluster.max_restarts=0", *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}",
            "-m", "dsa_dist.train.cli", *args, *[e for e in extra if not e.startswith("cluster.")]]


def tokens_per_s(run_dir: Path) -> float:
    """Mean of the logged tokens/s windows after the first."""
    recs = [json.loads(line) for line in (run_dir / "sparse" / "metrics.jsonl").read_text().splitlines()]
    values = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    kept = values[1:] or values
    return sum(kept) / len(kept)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per run")
    parser.add_argument("--extra", nargs="*", default=[], help="more config overrides (e.g. a CPU smoke run: "
                        "model_preset=tiny model.seq_len=256 model.params_dtype=float32 train.device=cpu)")
    args = parser.parse_args()

    import torch

    gpus = torch.cuda.device_count()
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", NCCL_NVLS_ENABLE="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for cp in args.cp:
        if gpus and cp > gpus:
            print(f"skip CP={cp}: {gpus} GPU(s)", flush=True)
            continue
        for launcher in ("torchrun", "ray"):
            run_dir = Path(tempfile.mkdtemp(prefix=f"bench_{launcher}_cp{cp}_"))
            log = out_dir / f"ray_vs_torchrun_{launcher}_cp{cp}.log"
            t0 = time.perf_counter()
            try:
                with open(log, "w") as fh:
                    cmd = command(launcher, cp, run_dir, args.steps, args.extra)
                    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                        timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - t0
            row = {"launcher": launcher, "cp": cp, "world_size": cp, "rc": rc, "wall_s": round(wall, 1),
                   "tokens_per_s": round(tokens_per_s(run_dir), 1) if rc == 0 else None, "log": log.name}
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {"device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus,
              "config": "configs/single_gpu.yaml pipeline=[sparse] (small model, seq 4096, global batch 8)",
              "steps": args.steps, "results": results}
    (out_dir / "ray_vs_torchrun.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'launcher':<10}{'cp':>4}{'tokens/s':>12}{'wall s':>9}")
    for r in results:
        tok = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else str(r["rc"])
        print(f"{r['launcher']:<10}{r['cp']:>4}{tok:>12}{r['wall_s']:>9}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
