"""Where log lines go: rank 0 to stdout, every rank to its own file in the run directory."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs to stdout; every rank logs to run_dir/logs/rank<N>.log, which also gets this
    package's debug lines (the phases of each epoch)."""
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
    for h in handlers:
        h.setFormatter(fmt)
        h._cluster_pipeline = True  # type: ignore[attr-defined]
        root.addHandler(h)
    log.debug("rank %d is pid %d on %s", rank, os.getpid(), socket.gethostname())


def log_error_to_files(message: str) -> None:
    """An error line in this rank's log file only, for an error the CLI prints to stderr
    itself: rank 0's stdout handler would print it a second time."""
    record = log.makeRecord("cluster_pipeline", logging.ERROR, __file__, 0, message, (), None)
    for h in logging.getLogger().handlers:
        if getattr(h, "_cluster_pipeline", False) and isinstance(h, logging.FileHandler):
            h.handle(record)
