"""The GRPO stage through the Ray launcher: ``python -m launch configs/grpo_tiny.yaml`` on the test cluster runs
rollouts and updates in the actor, checkpoints the stage and reports the reward in the job summary."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.launch.conftest import REPO, checkpoint_exists, finish, ray_env

GRPO_TINY = REPO / "configs" / "grpo_tiny.yaml"


def test_grpo_stage_runs_through_the_launcher(ray_head, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    args = [f"run_dir={run_dir}", "stages.grpo.steps=2", "rl.prompts_per_iteration=4", "rl.group_size=4",
            "logging.progress=none", "logging.log_interval=1", f"cluster.address={ray_head.gcs_address}",
            "cluster.placement_timeout_s=30"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launch", str(GRPO_TINY), *args], cwd=REPO, env=ray_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    rc, text = finish(proc, log, timeout=300)
    assert rc == 0, text[-4000:]
    assert checkpoint_exists(run_dir, "grpo", 2)
    records = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward/mean" in r] == [1, 2]
    assert "reward " in text and "dsa_dist job summary" in text  # the summary row shows the reward
