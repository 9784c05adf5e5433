"""``dsa-train [CONFIG.yaml] [key=value ...]``: run the configured stages (issue 5; docs/training.md).

With no arguments it runs ``configs/tiny.yaml``: dense -> warmup -> sparse on the tiny model on CPU.
Under ``torchrun`` (``$WORLD_SIZE`` set) every process runs the pipeline; otherwise, when the config asks for
more than one process (tp*cp*pp*dp > 1), dsa-train starts that many local processes itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dsa_dist.config import DEFAULT_CONFIG, TrainRunConfig, load_config

USAGE = """usage: dsa-train [CONFIG.yaml] [key=value ...]

  CONFIG.yaml   run config (default: configs/tiny.yaml -- the tiny model, dense -> warmup -> sparse on CPU)
  key=value     overrides, e.g. train.steps=50 parallel.cp=2 pipeline=[sparse] checkpoint.init_from=DIR

Stages resume from <run_dir>/<stage>/checkpoints automatically. See docs/training.md."""


def _spawned(rank: int, world_size: int, port: int, cfg: TrainRunConfig) -> None:
    _quiet_known_warnings()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from dsa_dist.train.loop import run_pipeline

    try:
        run_pipeline(cfg)
    finally:
        from dsa_dist.parallel import destroy_parallel

        destroy_parallel()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_known_warnings() -> None:
    """Silence warnings that say nothing actionable about a dsa-train run (they repeat on every rank)."""
    import warnings

    # Megatron-Core on machines without Transformer Engine / Apex: the torch fallbacks are what we use.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    # torch.distributed.checkpoint deprecations triggered inside Megatron's torch_dist strategy.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*(load_state_dict. is deprecated|DTensor).*")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_known_warnings()
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    path = DEFAULT_CONFIG
    if argv and "=" not in argv[0]:
        path, argv = Path(argv[0]), argv[1:]
    try:
        cfg = load_config(path, argv)
    except ValueError as err:
        print(f"dsa-train: config error: {err}", file=sys.stderr)
        return 2
    p = cfg.parallel
    world = p.tp * p.cp * p.pp * p.dp
    if "WORLD_SIZE" in os.environ or world == 1:
        from dsa_dist.parallel import destroy_parallel
        from dsa_dist.train.checkpoint import CheckpointError
        from dsa_dist.train.loop import run_pipeline

        try:
            run_pipeline(cfg)
        except CheckpointError as err:
            print(f"dsa-train: checkpoint error: {err}", file=sys.stderr)
            return 2
        finally:
            destroy_parallel()  # NCCL warns (and may leak) when the process group outlives the run
        return 0
    import torch.multiprocessing as mp

    print(f"dsa-train: starting {world} local processes (tp={p.tp} cp={p.cp} pp={p.pp} dp={p.dp})", flush=True)
    mp.start_processes(_spawned, args=(world, _free_port(), cfg), nprocs=world, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
