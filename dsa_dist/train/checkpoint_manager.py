"""A stage's checkpoints as one object: what goes in, which one to resume from, and the RNG streams.

:class:`CheckpointManager` (one per stage run; reusable by any trainer that holds a
:class:`~dsa_dist.train.setup.ModelAndOptimizer`):

- :meth:`~CheckpointManager.save` — model, optimizer, scheduler, the caller's train state and per-rank RNG, via
  :func:`~dsa_dist.train.checkpoint.save_checkpoint` (atomic, checksummed, verified, ``keep_last``). Refuses to
  save non-finite weights (:class:`~dsa_dist.train.errors.NonFiniteError`).
- :meth:`~CheckpointManager.latest_good` — the newest checkpoint whose files match their checksums. A corrupt
  one is moved aside to ``.corrupt.step_N`` with a warning and the previous one is used (collective: rank 0
  decides, every rank gets the same answer).
- :meth:`~CheckpointManager.restore` — a full resume (model, optimizer, scheduler, train state, RNG when the
  layout is unchanged) or weights only (the start of the next stage).
- Lineage: :func:`lineage_of` describes the checkpoint a stage starts from (path, stage, step, content digest);
  trainers store it in their train state, and :func:`check_lineage` refuses to resume a stage whose recorded
  origin differs from the checkpoint the run would start it from now.

RNG: Python, NumPy and torch CPU generators always; CUDA and Megatron's model-parallel tracker states on GPU.
The states are per rank (a ShardedObject per rank), so they are restored only under the same layout; a
resharded resume re-seeds from ``(seed, step, rank)``.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dsa_dist.compat import manual_seed
from dsa_dist.train import checkpoint as ckpt
from dsa_dist.train.cpu_scope import in_megatron_cpu_scope
from dsa_dist.train.errors import CheckpointError, NonFiniteError
from dsa_dist.train.optim import apply_schedule_after_resume, group_schedule
from dsa_dist.train.setup import ModelAndOptimizer
from dsa_dist.train.step import parameters_finite


def rng_state() -> dict:
    """This rank's random generator states (Python, NumPy, torch; CUDA and Megatron's tracker on GPU)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["megatron"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _from_rank0(value: object) -> object:
    """``value`` as rank 0 has it, on every rank (collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def verified(path: str | Path) -> dict:
    """:func:`~dsa_dist.train.checkpoint.verify_checkpoint` on rank 0, its verdict on every rank (collective).

    Returns the checkpoint's train state; raises :class:`CheckpointError` on every rank if it is broken.
    """
    result: tuple[dict | None, str | None] = (None, None)
    if _rank() == 0:
        try:
            result = (ckpt.verify_checkpoint(path), None)
        except CheckpointError as err:
            result = (None, str(err))
    state, error = _from_rank0(result)
    if error:
        raise CheckpointError(error)
    return state


class CheckpointManager:
    """Save / find / restore the checkpoints under ``root`` (``<run_dir>/<stage>/checkpoints``)."""

    def __init__(self, root: str | Path, *, keep_last: int, distributed_optimizer: bool = False) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.distributed_optimizer = distributed_optimizer

    # ------------------------------------------------------------------------------------------ state
    def sharded_state(self, parts: ModelAndOptimizer, *, is_loading: bool, with_optimizer: bool,
                      with_rng: bool, train_state: dict | None = None, optimizer_state: bool = True) -> dict:
        """The sharded state dict of ``parts`` (model; optimizer + scheduler + train state; per-rank RNG).

        ``optimizer_state=False`` leaves the optimizer's own state out (used while it has none: no update applied).
        """
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        model_sd = parts.gpt.sharded_state_dict()
        state: dict = {"model": model_sd}
        if with_optimizer:
            meta = {"distrib_optim_sharding_type": "fully_reshardable"} if self.distributed_optimizer else None
            if optimizer_state:
                state["optimizer"] = parts.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                        metadata=meta)
            state["scheduler"] = parts.scheduler.state_dict()
            state["train"] = dict(train_state or {})
        if with_rng:
            state["rng"] = ShardedObject("rng_state", rng_state(), (_world(),), (_rank(),), replica_id=0)
        return state

    # ------------------------------------------------------------------------------------------ save
    @in_megatron_cpu_scope
    def save(self, parts: ModelAndOptimizer, step: int, train_state: dict) -> Path:
        """Checkpoint ``parts`` at ``step`` with ``train_state`` (JSON-serialisable; collective)."""
        if not parameters_finite(parts.gpt):
            raise NonFiniteError(f"refusing to save step {step} to {self.root}: the model has non-finite weights "
                                 "(training diverged); the last checkpoint is kept. Lower the learning rate and "
                                 "resume")
        # Before the first applied update (e.g. every step so far skipped as non-finite) the optimizer has no
        # state; Megatron would save none but expect Adam's moments on load. Record that, and resume with a fresh
        # optimizer (which is exactly that empty state).
        train_state = {**train_state, "optimizer_state": optimizer_has_state(parts.optimizer)}
        state = self.sharded_state(parts, is_loading=False, with_optimizer=True, with_rng=True,
                                   train_state=train_state, optimizer_state=train_state["optimizer_state"])
        return ckpt.save_checkpoint(self.root, step, state, train_state, self.keep_last)

    # ------------------------------------------------------------------------------------------ find
    def latest_good(self) -> Path | None:
        """The newest checkpoint that passes verification; corrupt newer ones are moved aside (collective)."""
        chosen: str | None = None
        if _rank() == 0:
            for path in reversed(ckpt.list_checkpoints(self.root)):
                try:
                    ckpt.verify_checkpoint(path)
                except CheckpointError as err:
                    aside = path.with_name(f"{ckpt.CORRUPT_PREFIX}{path.name}")
                    n = 1
                    while aside.exists():
                        aside, n = path.with_name(f"{ckpt.CORRUPT_PREFIX}{path.name}.{n}"), n + 1
                    os.replace(path, aside)
                    _warn(f"{err}. Moved it aside to {aside} and falling back to the previous checkpoint")
                    continue
                chosen = str(path)
                break
        chosen = _from_rank0(chosen)
        return Path(chosen) if chosen else None

    # ------------------------------------------------------------------------------------------ restore
    @in_megatron_cpu_scope
    def restore(self, parts: ModelAndOptimizer, path: str | Path, *, full: bool, layout: dict,
                seed: int) -> dict:
        """Load checkpoint ``path`` into ``parts``; returns its train state.

        ``full``: model, optimizer, scheduler and RNG (a resume). The config's LR range wins over the one in the
        checkpoint (:func:`~dsa_dist.train.optim.apply_schedule_after_resume`). Otherwise the model weights only
        (a new stage starting from a previous one's result; fresh optimizer).
        """
        saved = ckpt.read_train_state(path)
        if full:
            same_layout = saved["layout"] == layout
            schedule = group_schedule(parts.optimizer)
            with_state = bool(saved.get("optimizer_state", True))
            state = ckpt.load_checkpoint(path, self.sharded_state(parts, is_loading=True, with_optimizer=True,
                                                                  with_rng=same_layout, optimizer_state=with_state))
            parts.gpt.load_state_dict(state["model"])
            if with_state:
                parts.optimizer.load_state_dict(state["optimizer"])
            else:  # saved before any applied update: the fresh optimizer is that state; refresh its master weights
                parts.optimizer.reload_model_params()
            parts.scheduler.load_state_dict(state["scheduler"])
            apply_schedule_after_resume(parts.optimizer, parts.scheduler, schedule)
            if same_layout:
                set_rng_state(state["rng"])
            else:  # per-rank RNG streams do not map onto another layout: derive fresh ones deterministically
                manual_seed(seed + 1_000_003 * int(saved["step"]) + _rank())
        else:
            state = ckpt.load_checkpoint(path, self.sharded_state(parts, is_loading=True, with_optimizer=False,
                                                                  with_rng=False))
            parts.gpt.load_state_dict(state["model"])
            parts.optimizer.reload_model_params()  # refresh fp32 master weights from the loaded bf16 ones
        return saved


def optimizer_has_state(optimizer) -> bool:
    """Whether the Megatron optimizer holds per-parameter state (Adam moments), i.e. took an update already."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(len(getattr(opt, "optimizer", opt).state) > 0 for opt in inner
               if getattr(opt, "optimizer", None) is not None)


def lineage_of(path: str | Path, state: dict) -> dict:
    """What a stage was initialised from: the checkpoint's path, stage, step and content digest."""
    return {"init_from": str(path), "stage": state.get("stage"), "step": state.get("step"),
            "digest": ckpt.checkpoint_digest(state)}


def check_lineage(stage: str, latest: Path, recorded: dict | None, now: dict) -> None:
    """Refuse to resume ``stage`` from ``latest`` when it was initialised from another checkpoint than ``now``."""
    if recorded is not None and recorded.get("digest") == now["digest"]:
        return
    was = (f"{recorded['init_from']} ({recorded['stage']} step {recorded['step']})" if recorded
           else "no checkpoint (random weights)")
    raise CheckpointError(
        f"cannot resume stage {stage!r} from {latest}: it was initialised from {was}, but the run now starts it "
        f"from {now['init_from']} ({now['stage']} step {now['step']}), a different checkpoint (the earlier stage "
        f"was extended or re-trained since). Move {latest.parent.parent} aside to train {stage!r} again from the "
        "new result, or restore the earlier stage's checkpoints to continue this one")
