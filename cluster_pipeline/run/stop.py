"""Stop requests: a signal asks the run to checkpoint and stop at its next safe point.

A signal handler may run in the middle of a forward pass or a collective, so it only records
the signal. The training loop polls the record at step boundaries, the ranks agree on it in
one all-reduce (signals reach ranks at different moments), and then all of them write the
checkpoint and stop together.

Locally the stop signals are Ctrl-C (SIGINT), SIGTERM, SIGUSR2 and SIGHUP, from the launcher,
its process group, or to a rank; a second Ctrl-C aborts at once without a checkpoint. Under
SLURM they are SIGTERM (scontrol requeue, preemption, the time limit) and USR2 (submitit's
signal before the time limit, or PreemptParameters=send_user_signal).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterable
from types import FrameType
from typing import Any

from cluster_pipeline.exits import EXIT_ABORTED, EXIT_STOPPED

log = logging.getLogger(__name__)

LOCAL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)
SLURM_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
STOP_SIGNALS = LOCAL_SIGNALS
# The PID of the launcher that started this rank (launch.local): the rank stops when it dies.
LAUNCHER_PID_ENV = "CLUSTER_PIPELINE_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


class Stopped(Exception):
    """The run wrote a checkpoint and stopped on a signal; running it again continues it."""

    exit_status = EXIT_STOPPED  # dist.exit_status_of

    def __init__(self, signum: int, checkpoint: str, requeued: bool = False) -> None:
        self.signum, self.checkpoint, self.requeued = signum, checkpoint, requeued
        name = signal.Signals(signum).name if signum else "request"
        then = "the job is requeued" if requeued else "run the same command again to continue"
        super().__init__(f"stopped on {name}; checkpoint {checkpoint}; {then}")


class StopFlag:
    """The signal this rank caught (0 if none), set by a handler and polled by the loop."""

    def __init__(self) -> None:
        self.signum = 0
        self.interrupts = 0

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.interrupts:
            # The second Ctrl-C: the user does not want to wait for the checkpoint.
            os.write(2, b"second Ctrl-C: aborting at once, without a checkpoint\n")
            os._exit(EXIT_ABORTED)
        self.interrupts += signum == signal.SIGINT
        if not self.signum:
            log.warning("caught %s: stopping at the next safe point", signal.Signals(signum).name)
            self.signum = signum

    def install(self, signals: Iterable[int] = LOCAL_SIGNALS) -> dict[int, Any]:
        """Record `signals` instead of dying on them; returns the handlers they replace."""
        return {s: signal.signal(s, self._record) for s in signals}

    def poll(self) -> int:
        """The signal caught so far, 0 if none (read at each safe point)."""
        return self.signum

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if `signum` had arrived."""
        self.signum = signum


def ignore_stop_signals() -> None:
    """Once a command has done its work: a stop signal arriving while it exits (SLURM's USR2
    just before the time limit) must not turn a finished run into a failed one."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def die_with_parent(signum: int, parent: int | None = None) -> None:
    """Have the kernel send `signum` to this process when its parent dies, even by SIGKILL
    (Linux; elsewhere nothing). If `parent` is given and is already gone, now."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)


def follow_launcher() -> None:
    """In a rank that launch.local started: SIGTERM (a stop, with a checkpoint) when the
    launcher dies, so that killing it, even with SIGKILL, stops its ranks."""
    parent = os.environ.get(LAUNCHER_PID_ENV)
    if parent and parent.isdigit():
        die_with_parent(signal.SIGTERM, int(parent))


def shield_child() -> None:
    """In a helper process of a rank (DataLoader worker, forkserver): a stop signal sent to
    the process group is the rank's to handle, and the helper dies with its parent."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
