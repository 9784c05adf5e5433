"""``dsa-train`` / ``dsa-prepare-data`` on bad input: one clear line on stderr, exit status 2, no traceback.

Config and pre-flight errors (YAML syntax, a non-mapping YAML, a section given a value, unknown keys, a run_dir
that is a file or cannot be written, a corrupt or too short corpus, a missing init_from) are checked in-process
through ``main()``; a failing multi-process run and Ctrl-C run the real command in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsa_dist.train.cli import main
from dsa_dist.train.prepare_data import main as prepare_main
from tests._dist import free_port
from tests.train._tiny import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def _run_main(capsys, args: list[str]) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


def _assert_one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("dsa-train:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def _tiny_dataset(tmp_path: Path, text: str) -> str:
    (tmp_path / "doc.txt").write_text(text)
    prefix = tmp_path / "corpus"
    assert prepare_main([str(tmp_path / "doc.txt"), "--output", str(prefix)]) == 0
    return str(prefix)


@pytest.mark.parametrize("yaml_text,args,needles", [
    ("train:\n  steps: [1\n", [], ["config error", "bad.yaml:3:1", "YAML syntax error", "line 2"]),
    ("- dense\n- sparse\n", [], ["config error", "bad.yaml", "top level must be a mapping"]),
    (None, ["model=5"], ["config error", "'model' is a config section", "got 5"]),
    (None, ["train.stepz=3"], ["config error", "unknown config key 'train.stepz'"]),
])
def test_config_errors_are_one_line(tmp_path, capsys, yaml_text, args, needles):
    config = "configs/tiny.yaml"
    if yaml_text is not None:
        config = str(tmp_path / "bad.yaml")
        Path(config).write_text(yaml_text)
    rc, err = _run_main(capsys, [str(REPO / config) if yaml_text is None else config, *args,
                                 f"run_dir={tmp_path / 'run'}"])
    assert rc == 2
    _assert_one_line(err, *needles)
    assert not (tmp_path / "run").exists()


def test_run_dir_is_checked_before_training(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    for run_dir, needle in ((a_file, "is a file, not a directory"), (a_file / "sub", "not a writable directory"),
                            ("/proc/dsa-train-run", "not a writable directory")):
        rc, err = _run_main(capsys, [str(REPO / "configs/tiny.yaml"), *tiny_overrides(run_dir)])
        assert rc == 2
        _assert_one_line(err, f"run_dir='{run_dir}'", needle)


def test_data_errors_stop_before_training(tmp_path, capsys):
    run = tmp_path / "run"
    short = _tiny_dataset(tmp_path, "too short")
    rc, err = _run_main(capsys, [str(REPO / "configs/tiny.yaml"), *tiny_overrides(run), f"data.corpus={short}"])
    assert rc == 2
    _assert_one_line(err, "data.corpus", "fewer than one training sequence")

    Path(short + ".bin").write_bytes(b"\0" * 3)  # damaged: the index describes 10 tokens
    rc, err = _run_main(capsys, [str(REPO / "configs/tiny.yaml"), *tiny_overrides(run), f"data.corpus={short}"])
    assert rc == 2
    _assert_one_line(err, "corpus.bin", "re-create it with dsa-prepare-data")
    assert not (run / "dense").exists()  # nothing trained


def test_missing_init_from_is_a_checkpoint_error(tmp_path, capsys):
    rc, err = _run_main(capsys, [str(REPO / "configs/tiny.yaml"),
                                 *tiny_overrides(tmp_path / "run", checkpoint__init_from=tmp_path / "nope")])
    assert rc == 2
    _assert_one_line(err, "checkpoint error", "does not exist")


def _fake_checkpoint(path: Path) -> Path:
    """A directory that looks like a complete checkpoint (all files present) but whose shards are garbage."""
    path.mkdir(parents=True)
    for name in ("metadata.json", ".metadata", "common.pt", "__0_0.distcp"):
        (path / name).write_bytes(os.urandom(256))
    (path / "train_state.json").write_text(json.dumps({"step": 4, "stage": "dense", "consumed_samples": 8,
                                                       "layout": {}}))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_multi_process_failure_is_reported_once(tmp_path):
    """Two local ranks (parallel.cp=2) both fail to load a corrupt init_from: one line, naming a rank."""
    ckpt = _fake_checkpoint(tmp_path / "bad_ckpt")
    args = ["configs/tiny.yaml", *tiny_overrides(tmp_path / "run", parallel__cp=2, parallel__dp=1,
                                                 train__micro_batch_size=1, train__global_batch_size=2,
                                                 checkpoint__init_from=ckpt, pipeline="[sparse]")]
    proc = subprocess.run([sys.executable, "-m", "dsa_dist.train.cli", *args], cwd=REPO, env=_env(), text=True,
                          capture_output=True, timeout=500)
    assert "starting 2 local processes" in proc.stdout
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    _assert_one_line(proc.stderr, "dsa-train: rank ", "checkpoint error", str(ckpt), "could not be loaded")
    assert not list((tmp_path / "run").glob("sparse/checkpoints/step_*"))


def test_ctrl_c_stops_without_traceback(tmp_path):
    args = ["configs/tiny.yaml", *tiny_overrides(tmp_path / "run", stages__dense__steps=10_000, pipeline="[dense]")]
    proc = subprocess.Popen([sys.executable, "-m", "dsa_dist.train.cli", *args], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 400
        for line in proc.stdout:  # wait until training runs
            if "step 1 |" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    _assert_one_line(err, "interrupted")


def test_error_lines_name_the_cause():
    import errno

    from dsa_dist.train.checkpoint import CheckpointError
    from dsa_dist.train.local_ranks import describe_error

    line, status = describe_error(OSError(errno.ENOSPC, "No space left on device", "/runs/x/step_10/a.distcp"))
    assert status == 2 and "ENOSPC" in line and "/runs/x/step_10/a.distcp" in line
    assert describe_error(CheckpointError("checkpoint /c is corrupted")) == ("checkpoint error: checkpoint /c is "
                                                                            "corrupted", 2)
    assert describe_error(ValueError("data.corpus='x': missing")) == ("error: data.corpus='x': missing", 2)
    assert describe_error(RuntimeError("a bug")) is None  # unexpected errors keep their traceback
