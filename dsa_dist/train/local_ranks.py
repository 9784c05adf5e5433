"""Start the ranks of a multi-process run on this machine, and report a failure once, as one line.

``dsa-train`` uses this when the config asks for more than one process and no launcher (torchrun, Ray) started
them. Each rank runs :func:`dsa_dist.train.pipeline.run_pipeline` in a spawned process. When a rank fails it writes
one line (the error, and for an unexpected exception the path of its full traceback) to a private error
directory and exits; the parent stops the other ranks at the first failure -- their errors are only echoes of
the first (a peer closing a connection) -- and prints the earliest line, naming the rank.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path

from dsa_dist.config import TrainRunConfig

INTERRUPTED = 130  # exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it


def describe_error(err: BaseException) -> tuple[str, int] | None:
    """``(one-line message, exit status)`` for an error a user can fix, or None for an unexpected one (a bug).

    User errors are ``ValueError`` (bad config or data), ``OSError`` (disk full, permissions: the errno name and
    the path are printed) and every exception class defined in dsa_dist itself (``CheckpointError`` and the
    like), whose messages are written for the user.
    """
    from dsa_dist.train.checkpoint import CheckpointError
    from dsa_dist.train.errors import TrainingError

    if isinstance(err, CheckpointError):
        return f"checkpoint error: {err}", 2
    if isinstance(err, TrainingError):
        return f"error: {err}", 2
    if isinstance(err, ValueError) or type(err).__module__.startswith("dsa_dist."):
        return f"error: {err}", 2
    if isinstance(err, OSError):
        import errno

        code = errno.errorcode.get(err.errno or 0, "")
        where = f": {err.filename}" if err.filename else ""
        return f"I/O error: {err.strerror or err} ({code}){where}", 2
    return None


def _rank_main(rank: int, world_size: int, port: int, cfg: TrainRunConfig, error_dir: str) -> None:
    import os

    from dsa_dist.train.procguard import die_with_parent

    # SIGKILL, not SIGTERM: a stopped (SIGSTOP) rank ignores TERM, and no rank may outlive the launcher.
    die_with_parent(signal.SIGKILL, os.getppid())
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from dsa_dist.train.cli import quiet_known_warnings

    quiet_known_warnings()
    status = 0
    try:
        from dsa_dist.train.pipeline import run_pipeline

        run_pipeline(cfg)
    except KeyboardInterrupt:
        status = INTERRUPTED
    except BaseException as err:  # noqa: BLE001 - every failure of a rank is reported through the error file
        known = describe_error(err)
        if known is None:
            trace = Path(cfg.run_dir) / f"error.rank{rank}.txt"
            try:
                trace.write_text(traceback.format_exc())
                line = f"{type(err).__name__}: {err} (traceback: {trace})"
            except OSError:
                line = f"{type(err).__name__}: {err}"
            known = (line, 1)
        line, status = " ".join(known[0].splitlines()), known[1]
        record = {"time": time.time(), "rank": rank, "line": line, "status": status}
        (Path(error_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        from dsa_dist.parallel import destroy_parallel

        with contextlib.suppress(Exception):  # after a failed collective the group may be half torn down already
            destroy_parallel()
    sys.exit(status)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 10
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_local_ranks(cfg: TrainRunConfig, world_size: int) -> int:
    """Run ``world_size`` ranks of ``cfg`` here; 0 when all succeed, else print one line and return its status."""
    ctx = mp.get_context("spawn")  # fork would copy torch/threads state; spawn is what Megatron's writer needs too
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="dsa-train-errors-") as error_dir:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, cfg, error_dir), name=f"rank{r}")
                 for r in range(world_size)]
        try:
            for p in procs:
                p.start()
            running = list(procs)
            failed = None
            while running and failed is None:
                for sentinel in wait([p.sentinel for p in running]):
                    p = next(q for q in running if q.sentinel == sentinel)
                    p.join()
                    running.remove(p)
                    if p.exitcode != 0 and failed is None:
                        failed = p
        except KeyboardInterrupt:
            _stop(procs)
            print("dsa-train: interrupted", file=sys.stderr)
            return INTERRUPTED
        if failed is None:
            return 0
        _stop(procs)
        records = [json.loads(f.read_text()) for f in Path(error_dir).glob("rank*.json")]
    if records:
        first = min(records, key=lambda r: r["time"])
        others = f" ({len(records) - 1} other rank(s) failed after it)" if len(records) > 1 else ""
        print(f"dsa-train: rank {first['rank']}: {first['line']}{others}", file=sys.stderr)
        return int(first["status"])
    rank, code = procs.index(failed), failed.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    print(f"dsa-train: rank {rank}: {how} without reporting an error", file=sys.stderr)
    return INTERRUPTED if code == INTERRUPTED else 1
