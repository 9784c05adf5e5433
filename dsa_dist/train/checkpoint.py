"""Sharded, crash-safe, verified, reshardable checkpoints with Megatron-Core ``dist_checkpointing``.

Layout of one stage's checkpoint root (``<run_dir>/<stage>/checkpoints``)::

    step_00000020/            a complete checkpoint (torch_dist format)
        metadata.json         dist_checkpointing backend record
        .metadata, *.distcp   the sharded tensors (model, optimizer state) and sharded objects (per-rank RNG)
        common.pt             non-sharded state (scheduler, step, stage, data position), written by rank 0
        train_state.json      our record (step, stage, data position, layout, lineage, and a blake2b checksum
                              and size of every other file); written LAST, before the rename
    .tmp.step_00000040/       a save in progress (ignored; removed by the next save)
    .deleting.step_00000010/  an old checkpoint being deleted (ignored; removed by the next save)
    .corrupt.step_00000030/   a checkpoint that failed verification, moved aside for inspection

**Atomicity.** Every rank writes into ``.tmp.step_N``; after a barrier rank 0 checksums the files, writes
``train_state.json`` (fsynced) and renames the directory to ``step_N``, then fsyncs the root directory so the
rename itself survives a power loss. A rename within one directory is atomic on POSIX file systems, so a process
killed at any point leaves either no ``step_N`` or a complete one. The published directory is verified against
its checksums before the save reports success. Old checkpoints beyond ``keep_last`` are deleted only after that,
and atomically: renamed to ``.deleting.step_N`` first, then removed, so a kill during the cleanup never leaves a
``step_N`` that looks complete but misses a shard. A save never replaces an existing ``step_N``
(:class:`CheckpointError`). Multi-node runs need ``run_dir`` on a shared file system (as Megatron does).

**Errors.** A write that fails (disk full: ENOSPC, quota, permissions) raises :class:`CheckpointError` naming
the errno and the path; the half-written ``.tmp`` directory is removed and earlier checkpoints are untouched.
:func:`verify_checkpoint` recomputes the checksums: a corrupt shard is reported by name
(:class:`dsa_dist.train.checkpoint_manager.CheckpointManager` then falls back to the previous checkpoint).

**Resharding.** Model tensors are ShardedTensors with their global shapes, so a checkpoint saved under one
TP/CP/DP layout loads under another. The non-distributed Megatron optimizer (CPU and the default on GPU) maps
each Adam moment onto its parameter's ShardedTensor, so it reshards the same way. With the distributed
optimizer we save in Megatron's ``fully_reshardable`` format. RNG states are per rank: they are restored
only when the layout is unchanged (see checkpoint_manager.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dsa_dist.train.errors import CheckpointError
from dsa_dist.train.procguard import guard_child_processes

__all__ = ["CheckpointError", "STEP_PREFIX", "TMP_PREFIX", "DELETING_PREFIX", "CORRUPT_PREFIX", "TRAIN_STATE",
           "step_dir_name", "list_checkpoints", "latest_checkpoint", "read_train_state", "file_checksums",
           "verify_checkpoint", "save_checkpoint", "load_checkpoint", "remove_checkpoint", "checkpoint_digest"]

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp."
DELETING_PREFIX = ".deleting."
CORRUPT_PREFIX = ".corrupt."
TRAIN_STATE = "train_state.json"
_CHUNK = 1 << 22


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _agree(error: str | None) -> str | None:
    """The first rank's error message, the same on every rank (collective): all ranks fail together or none."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """The newest complete checkpoint under ``root``, or None (not verified: see CheckpointManager.latest_good)."""
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


def _blake2b(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_checksums(path: str | Path) -> dict[str, dict]:
    """``{file name: {"size": bytes, "blake2b": hex}}`` of every file of checkpoint ``path`` but train_state.json."""
    path = Path(path)
    return {f.name: {"size": f.stat().st_size, "blake2b": _blake2b(f)}
            for f in sorted(path.iterdir()) if f.is_file() and f.name != TRAIN_STATE}


def checkpoint_digest(state: dict) -> str:
    """A short identity of a checkpoint: a digest of its stage, step and file checksums (for stage lineage)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([state.get("stage"), state.get("step"), state.get("files")], sort_keys=True).encode())
    return h.hexdigest()


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file of checkpoint ``path`` against the checksums in its train_state.json; returns the state.

    Raises :class:`CheckpointError` naming the first missing, resized or altered file. Checkpoints written
    before checksums were recorded (no ``files`` entry) are only checked for completeness.
    """
    path = Path(path)
    state = read_train_state(path)
    for name, want in (state.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} is missing")
        if f.stat().st_size != want["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} has {f.stat().st_size} bytes, "
                                  f"{want['size']} were written")
        if _blake2b(f) != want["blake2b"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: the checksum of {name} does not match the one "
                                  "recorded at save time (the file was altered after the save)")
    return state


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (its cause/context chain), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err
        err = err.__cause__ or err.__context__
    return None


def _describe_write_error(err: BaseException, where: Path) -> str:
    os_err = _os_error(err)
    text = str(err)
    if (os_err is not None and os_err.errno == errno.ENOSPC) or "No space left on device" in text \
            or f"[Errno {errno.ENOSPC}]" in text:
        return (f"disk full (ENOSPC: no space left on device) while writing checkpoint {where}; free space on "
                "that file system (or move run_dir) and resume")
    if os_err is not None:
        name = errno.errorcode.get(os_err.errno, str(os_err.errno))
        return f"cannot write checkpoint {where} ({name}: {os_err.strerror}; file {os_err.filename})"
    reason = (text.strip().splitlines() or [type(err).__name__])[-1]
    return f"cannot write checkpoint {where} ({type(err).__name__}: {reason})"


def remove_checkpoint(path: Path) -> None:
    """Delete checkpoint ``path`` atomically: rename it out of the ``step_*`` namespace, then remove the files."""
    aside = path.with_name(DELETING_PREFIX + path.name)
    os.replace(path, aside)
    _fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _write_train_state(tmp: Path, train_state: dict) -> None:
    record = dict(train_state, files=file_checksums(tmp))
    with open(tmp / TRAIN_STATE, "w") as fh:
        json.dump(record, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())  # the record must be on disk before the rename publishes the checkpoint


def save_checkpoint(root: str | Path, step: int, sharded_state_dict: dict[str, Any], train_state: dict,
                    keep_last: int) -> Path:
    """Save ``sharded_state_dict`` as ``root/step_<step>`` atomically and verified (collective: every rank).

    ``train_state`` (JSON-serialisable) is written by rank 0 last, with the checksums of every file; the
    directory is renamed into place, verified, and checkpoints older than the newest ``keep_last`` are removed.
    Raises :class:`CheckpointError` (on every rank) when ``step_<step>`` exists already or a write fails.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (TMP_PREFIX + step_dir_name(step))
    error = None
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in [*root.glob(TMP_PREFIX + "*"), *root.glob(DELETING_PREFIX + "*")]:
                shutil.rmtree(stale, ignore_errors=True)  # leftovers of interrupted saves / deletions
            if final.exists():
                error = (f"refusing to save step {step}: {final} exists already and a save never replaces a "
                         "checkpoint (is another run writing into this run_dir, or was it copied in?)")
            else:
                tmp.mkdir()
        except OSError as err:
            error = _describe_write_error(err, tmp)
    if error := _agree(error):
        raise CheckpointError(error)
    guard_child_processes()  # Megatron's torch_dist writer forks one process per file: they die with this rank
    try:
        dist_checkpointing.save(sharded_state_dict, str(tmp), sharded_strategy=("torch_dist", 1))
        error = None
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - every write failure becomes one clear error
        error = _describe_write_error(err, tmp)
    if not (error := _agree(error)) and _rank() == 0:
        try:
            _write_train_state(tmp, train_state)
            os.replace(tmp, final)
            _fsync_dir(root)  # the rename is durable only once the directory entry is on disk
            verify_checkpoint(final)  # never report success for data that is not there
        except OSError as err:
            error = _describe_write_error(err, tmp)
        except CheckpointError as err:
            aside = root / (CORRUPT_PREFIX + final.name)
            with contextlib.suppress(OSError):  # never leave an unverified checkpoint where resume looks
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            error = (f"checkpoint {final} failed verification right after the save ({err}); moved it aside to "
                     f"{aside}. The file system lost or changed data: check it before resuming")
    if error := _agree(error):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(error)
    if _rank() == 0:
        for old in list_checkpoints(root)[:-keep_last]:
            remove_checkpoint(old)
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
