"""Where log lines go: rank 0 to stdout, every rank to its own files in the run directory.

logs/rank<N>.log is what a user follows (`tail -f`): INFO and above, and on rank 0 the epoch
table as stdout shows it. logs/rank<N>.debug.log adds this package's DEBUG lines (each phase's
start and end, which pid a rank is).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs to stdout; every rank logs to run_dir/logs/rank<N>.log (INFO) and
    rank<N>.debug.log (with this package's DEBUG lines)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    logging.getLogger("cluster_pipeline").setLevel(logging.DEBUG)
    for h in list(root.handlers):
        if getattr(h, "_cluster_pipeline", False):
            root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
        handlers[-1].setLevel(logging.INFO)
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / f"rank{rank}.log"))
        handlers[-1].setLevel(logging.INFO)
        handlers.append(logging.FileHandler(run_dir / "logs" / f"rank{rank}.debug.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._cluster_pipeline = True  # type: ignore[attr-defined]
        root.addHandler(h)
    log.debug("rank %d is pid %d on %s", rank, os.getpid(), socket.gethostname())


def log_to_files(message: str, level: int = logging.INFO) -> None:
    """A line in this rank's log files only, for what the CLI prints to stdout or stderr
    itself (an error, the epoch table): rank 0's stdout handler would print it a second time."""
    record = log.makeRecord("cluster_pipeline", level, __file__, 0, message, (), None)
    for h in logging.getLogger().handlers:
        ours = getattr(h, "_cluster_pipeline", False) and isinstance(h, logging.FileHandler)
        if ours and record.levelno >= h.level:
            h.handle(record)


def log_error_to_files(message: str) -> None:
    log_to_files(message, logging.ERROR)


def progress(items: Iterable[T], desc: str, show: bool) -> Iterable[T]:
    """`items` behind a tqdm bar when `show` (rank 0 with run.progress), else as they are: a
    tqdm made even with disable=True starts its monitor thread, and a rank that runs no
    Python thread but its main one forks its loader workers instead of asking the forkserver
    (`data.loader.worker_start_method`)."""
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)
