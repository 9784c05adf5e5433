"""``dsa-train [CONFIG.yaml] [key=value ...]``: run the configured stages (docs/training.md).

With no arguments it runs ``configs/tiny.yaml``: dense -> warmup -> sparse on the tiny model on CPU.
Under ``torchrun`` (``$WORLD_SIZE`` set) every process runs the pipeline; otherwise, when the config asks for
more than one process (tp*cp*pp*dp > 1), dsa-train starts that many local processes itself
(:mod:`dsa_dist.train.local_ranks`). Before anything trains, the config, the run directory, ``init_from`` and the
data are checked; a problem is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from dsa_dist.config import DEFAULT_CONFIG, TrainRunConfig, load_config
from dsa_dist.train.local_ranks import INTERRUPTED, describe_error, run_local_ranks

USAGE = """usage: dsa-train [CONFIG.yaml] [key=value ...]

  CONFIG.yaml   run config (default: configs/tiny.yaml -- the tiny model, dense -> warmup -> sparse on CPU)
  key=value     overrides, e.g. train.steps=50 parallel.cp=2 pipeline=[sparse] checkpoint.init_from=DIR

Stages resume from <run_dir>/<stage>/checkpoints automatically. See docs/training.md."""


def quiet_known_warnings() -> None:
    """Silence warnings that say nothing actionable about a dsa-train run (they repeat on every rank)."""
    import warnings

    # Megatron-Core on machines without Transformer Engine / Apex: the torch fallbacks are what we use.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    # torch.distributed.checkpoint deprecations triggered inside Megatron's torch_dist strategy.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*(load_state_dict. is deprecated|DTensor).*")
    # Megatron-Core 0.16 TransformerConfig default (cuda_graph_scope), unrelated to anything a user set.
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")


def check_run_dir(run_dir: str) -> None:
    """Create ``run_dir`` and prove it writable now, not at the first checkpoint; ``ValueError`` if it is not."""
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"run_dir={run_dir!r} is a file, not a directory; choose another run_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"run_dir={run_dir!r} is not a writable directory ({err.strerror or err}); choose a "
                         "directory you can write to") from None


def preflight(cfg: TrainRunConfig) -> None:
    """Every check that needs the file system, before any process trains: run dir, init_from, data."""
    from dsa_dist.train.checkpoint import read_train_state
    from dsa_dist.train.data import check_data

    check_run_dir(cfg.run_dir)
    if cfg.checkpoint.init_from:
        read_train_state(cfg.checkpoint.init_from)
    check_data(cfg)


def _train_here(cfg: TrainRunConfig) -> None:
    from dsa_dist.parallel import destroy_parallel
    from dsa_dist.train.pipeline import run_pipeline

    try:
        run_pipeline(cfg)
    finally:
        destroy_parallel()  # NCCL warns (and may leak) when the process group outlives the run


def main(argv: list[str] | None = None) -> int:
    """Run ``dsa-train``; returns the exit status (0, 2 for any error a user can fix, 130 after Ctrl-C)."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("dsa-train: interrupted", file=sys.stderr)
        return INTERRUPTED


def _main(argv: list[str]) -> int:
    quiet_known_warnings()
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    path = DEFAULT_CONFIG
    if argv and "=" not in argv[0]:
        path, argv = Path(argv[0]), argv[1:]
    try:
        cfg = load_config(path, argv)
    except ValueError as err:
        print(f"dsa-train: config error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    try:
        preflight(cfg)
        world = cfg.parallel.world_size
        if "WORLD_SIZE" in os.environ or world == 1:
            _train_here(cfg)
            return 0
        print(f"dsa-train: starting {world} local processes (tp={cfg.parallel.tp} cp={cfg.parallel.cp} "
              f"pp={cfg.parallel.pp} dp={cfg.parallel.dp})", flush=True)
        return run_local_ranks(cfg, world)
    except Exception as err:  # noqa: BLE001 - user errors become one line; anything else is a bug: re-raise
        known = describe_error(err)
        if known is None:
            raise
        line, status = known
        rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""
        print(f"dsa-train: {rank}{' '.join(line.splitlines())}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
