"""One writer per run directory: a lock file held by a training run's rank 0 for its life.

`<run dir>/.lock` names its holder: host, PID (with the process's start time, so a reused PID
is not taken for the holder), SLURM job id and since when. A second run on the directory
refuses at once with one line naming the holder. The lock is taken over only when its holder
is provably gone:
- on this host, when no process has its PID and start time;
- under SLURM, when it is this very job (a requeued attempt: SLURM runs one attempt at a time),
  or when SLURM (squeue, else sacct) no longer has its job queued or running.
A holder on another host without a SLURM job cannot be proven gone: the error says how to
remove the lock by hand. Taking and taking over happen under an flock on `.lock.guard`, so two
runs starting at once cannot both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster_pipeline.exits import EXIT_BAD_INPUT
from cluster_pipeline.launcher.cluster import ClusterError, queued_states

LOCK_NAME = ".lock"


class RunDirInUse(Exception):
    """Another run holds the run directory."""

    exit_status = EXIT_BAD_INPUT


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None
    if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def this_holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def read_holder(run_dir: Path | str) -> dict[str, Any] | None:
    """The holder recorded in the run directory's lock, or None when it is not locked."""
    try:
        return dict(json.loads((Path(run_dir) / LOCK_NAME).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: held by someone we cannot name


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unreadable lock"
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def _slurm_job_listed(job_id: str) -> bool | None:
    """Whether SLURM still has the job queued or running; None when SLURM does not answer."""
    try:
        return job_id in queued_states([job_id])
    except ClusterError:
        return None


def gone(holder: dict[str, Any]) -> bool:
    """Whether the holder is provably gone (see the module's docstring)."""
    if not holder:
        return False
    here = holder.get("host") == socket.gethostname()
    job, mine = holder.get("job_id"), os.environ.get("SLURM_JOB_ID")
    if job and job == mine:
        return True  # this job's previous attempt
    if here and (_start_time(int(holder.get("pid", 0))) != holder.get("start")):
        return True
    if here and not job:
        return False  # that process is alive
    if job:
        return _slurm_job_listed(str(job)) is False
    return False


def acquire(run_dir: Path) -> None:
    """Take the run directory's lock, or raise RunDirInUse naming its holder."""
    lock = run_dir / LOCK_NAME
    record = json.dumps(this_holder()) + "\n"
    with open(run_dir / f"{LOCK_NAME}.guard", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        holder = read_holder(run_dir)
        if holder is not None:
            if not gone(holder):
                raise RunDirInUse(
                    f"run directory {run_dir} is in use by {describe(holder)}: one run writes "
                    f"a run directory at a time (if that run has ended, delete {lock})"
                )
            lock.unlink()
        tmp = run_dir / f"{LOCK_NAME}.{os.getpid()}.tmp"
        tmp.write_text(record)
        tmp.replace(lock)


def release(run_dir: Path) -> None:
    """Give the lock up, if this process still holds it."""
    holder = read_holder(run_dir)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            (run_dir / LOCK_NAME).unlink()


@contextlib.contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """The lock, for the life of the block."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
