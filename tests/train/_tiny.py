"""Shared setup of the training tests: a tiny, fast run config and held-out batches (not a test module)."""

from __future__ import annotations

import os
from pathlib import Path

from dsa_dist.config import DEFAULT_CONFIG, TrainRunConfig, load_config

# A shared byte-tokenized stdlib corpus for all training tests (first 40 files, built once per machine).
CACHE = os.environ.get("DSA_TEST_DATA_CACHE", str(Path.home() / ".cache" / "dsa_dist" / "test_data"))


def tiny_overrides(run_dir: str | Path, **extra: object) -> list[str]:
    """tiny.yaml shrunk for tests: seq 64, top-k 16, 2 x 2 sequences per step, no task evals, quiet."""
    base = {
        "run_dir": str(run_dir), "model.seq_len": 64, "model.indexer.topk": 16,
        "data.cache_dir": CACHE, "data.stdlib_max_files": 40, "data.task_fraction": 0.0, "data.eval_tasks": "[]",
        "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.threads": 1,
        "checkpoint.interval": 0, "logging.log_interval": 1, "logging.progress": "none", "logging.recall": "false",
        "stages.dense.steps": 40, "stages.warmup.steps": 30, "stages.sparse.steps": 30,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(run_dir: str | Path, world_size: int = 1, **extra: object) -> TrainRunConfig:
    return load_config(DEFAULT_CONFIG, tiny_overrides(run_dir, **extra), world_size=world_size)


def held_out_batches(trainer, n: int = 4, seed: int = 4242) -> list:
    """Fixed full-sequence batches (micro-batch size of the trainer) from another seed than training's."""
    from dsa_dist.train.data import DataStream

    stream = DataStream(trainer.windows, trainer.tokenizer, seed=seed, micro_batch_size=trainer.plan.micro_batch_size,
                        num_microbatches=n)
    return stream.next_global_batch()


def run_ranks(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """``tests._dist.run_distributed`` with non-daemonic ranks (they save checkpoints, see its docstring)."""
    from tests._dist import run_distributed

    return run_distributed(fn, world_size, *args, timeout=timeout, daemon=False)


def corrupt_a_shard(step_dir: Path) -> None:
    """Write 4 KB of garbage into the middle of one ``.distcp`` shard of checkpoint ``step_dir`` (its size does
    not change, so only the stored checksums can tell)."""
    shard = sorted(Path(step_dir).glob("*.distcp"))[0]
    with open(shard, "r+b") as fh:
        fh.seek(max(0, shard.stat().st_size // 2 - 2048))
        fh.write(os.urandom(4096))
