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
import time
from collections.abc import Iterable, Iterator, Sized
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


def progress(items: Iterable[T], desc: str, show: bool, *, every_s: float = 30.0) -> Iterable[T]:
    """`items` as they are unless `show` (rank 0 with run.progress). Then, on a terminal, behind
    a tqdm bar; else (stdout or stderr redirected: a log file, SLURM's output) with a plain log
    line every `every_s` seconds and at the end, since a bar's \\r and ANSI codes garble a file.

    No thread is started but tqdm's: a tqdm made even with disable=True starts its monitor
    thread, and a rank that runs no Python thread but its main one forks its loader workers
    instead of asking the forkserver (`data.loader.worker_start_method`)."""
    if not show:
        return items
    if sys.stdout.isatty() and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False)
    return logged_progress(items, desc, every_s)


def logged_progress(items: Iterable[T], desc: str, every_s: float) -> Iterator[T]:
    """`items`, logging "desc: n/total batches (p%), r batch/s, eta s" when `every_s` have passed
    since the last line (the clock is read per item), and once at the end."""
    total = len(items) if isinstance(items, Sized) else None
    start = last = time.monotonic()
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            log.info("%s", progress_line(desc, n, total, now - start, done=False))
    log.info("%s", progress_line(desc, n, total, time.monotonic() - start, done=True))


def progress_line(desc: str, n: int, total: int | None, elapsed: float, done: bool) -> str:
    rate = n / elapsed if elapsed > 0 else 0.0
    pct = 100 * n // total if total else 100  # an empty loader is done
    count = f"{n} batches" if total is None else f"{n}/{total} batches ({pct}%)"
    if done:
        when = f"done in {elapsed:.1f} s"
    elif total is None or rate == 0:
        when = f"{elapsed:.0f} s so far"
    else:
        when = f"eta {(total - n) / rate:.0f} s"
    return f"{desc}: {count}, {rate:.1f} batch/s, {when}"
