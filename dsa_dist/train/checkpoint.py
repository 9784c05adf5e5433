"""Sharded, crash-safe, reshardable checkpoints with Megatron-Core ``dist_checkpointing`` (issue 5 §4).

Layout of one stage's checkpoint root (``<run_dir>/<stage>/checkpoints``)::

    step_00000020/            a complete checkpoint (torch_dist format)
        metadata.json         dist_checkpointing backend record
        .metadata, *.distcp   the sharded tensors (model, optimizer state) and sharded objects (per-rank RNG)
        common.pt             non-sharded state (scheduler, step, stage, data position), written by rank 0
        train_state.json      our record (step, stage, data position, layout); written LAST, before the rename
    .tmp.step_00000040/       a save in progress (ignored; removed by the next save)

**Atomicity.** Every rank writes into ``.tmp.step_N``; after a barrier rank 0 writes ``train_state.json`` and
renames the directory to ``step_N``. A rename within one directory is atomic on POSIX file systems, so a process
killed at any point leaves either no ``step_N`` or a complete one; the previous checkpoint is never touched
until the new one exists (only then are checkpoints beyond ``keep_last`` deleted). Multi-node runs need
``run_dir`` on a shared file system (as Megatron does).

**Resharding.** Model tensors are ShardedTensors with their global shapes, so a checkpoint saved under one
TP/CP/DP layout loads under another. The non-distributed Megatron optimizer (CPU and the default on GPU) maps
each Adam moment onto its parameter's ShardedTensor, so it reshards the same way. With the distributed
optimizer we save in Megatron's ``fully_reshardable`` format. RNG states are per rank: they are restored
only when the layout is unchanged (a resharded resume re-seeds from ``(seed, step, rank)``, see loop.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp."
TRAIN_STATE = "train_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or unreadable (the message says which and what to do)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with ``train_state.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit():
            if (p / TRAIN_STATE).is_file():
                found.append((int(p.name[len(STEP_PREFIX):]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def read_train_state(path: str | Path) -> dict:
    """Validate a checkpoint directory's files and return its ``train_state.json``; CheckpointError if broken."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check checkpoint.init_from / the run_dir, or "
                              "start without it")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory (a checkpoint is a step_NNNNNNNN/ folder)")
    state_file = path / TRAIN_STATE
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {TRAIN_STATE} is missing (the save was "
                              "interrupted, or this is not a dsa-train checkpoint); delete it or use an older one")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted: {state_file} is unreadable ({err}); delete the "
                              "directory to fall back to the previous checkpoint") from None
    missing = [n for n in ("metadata.json", ".metadata", "common.pt") if not (path / n).is_file()]
    if missing or not any(path.glob("*.distcp")):
        missing += [] if any(path.glob("*.distcp")) else ["*.distcp"]
        raise CheckpointError(f"checkpoint {path} is corrupted: missing {missing}; delete the directory to fall "
                              "back to the previous checkpoint")
    for key in ("step", "stage", "consumed_samples", "layout"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} is corrupted: {TRAIN_STATE} has no {key!r}")
    return state


def save_checkpoint(root: str | Path, step: int, sharded_state_dict: dict[str, Any], train_state: dict,
                    keep_last: int) -> Path:
    """Save ``sharded_state_dict`` as ``root/step_<step>`` atomically (collective: call on every rank).

    ``train_state`` (JSON-serialisable) is written by rank 0 last, then the directory is renamed into place and
    checkpoints older than the newest ``keep_last`` are removed.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (TMP_PREFIX + step_dir_name(step))
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TMP_PREFIX + "*"):  # leftovers of interrupted saves
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(sharded_state_dict, str(tmp), sharded_strategy=("torch_dist", 1))
    _barrier()
    if _rank() == 0:
        state_file = tmp / TRAIN_STATE
        with open(state_file, "w") as fh:
            json.dump(train_state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())  # the record must be on disk before the rename publishes the checkpoint
        if final.exists():  # same step saved before (e.g. a re-run): keep the existing complete one
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, sharded_state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load the entries of ``sharded_state_dict`` from checkpoint ``path`` (collective); clear errors if broken."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    read_train_state(path)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(path))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - any reader failure = unusable checkpoint
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]  # the root cause is the last line
        raise CheckpointError(f"checkpoint {path} could not be loaded ({reason}). It is "
                              "corrupted or was written for a different model configuration; delete it to fall "
                              "back to the previous checkpoint, or fix model.* to match it") from err
