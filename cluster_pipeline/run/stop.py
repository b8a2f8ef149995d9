"""Stop requests: a signal asks the run to checkpoint and stop at its next safe point.

A signal handler may run in the middle of a forward pass or a collective, so it only records
the signal. The training loop polls the record at step boundaries, the ranks agree on it in
one all-reduce (signals reach ranks at different moments), and then all of them write the
checkpoint and stop together. Under SLURM the signal is submitit's USR2 (preemption or
timeout); in a local torchrun it is SIGTERM or SIGUSR2.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

LOCAL_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Stopped(Exception):
    """The run wrote a checkpoint and stopped on a signal; running it again continues it."""

    exit_status = 75  # EX_TEMPFAIL, as cli.EXIT_STOPPED (dist.exit_status_of)

    def __init__(self, signum: int, checkpoint: str, requeued: bool = False) -> None:
        self.signum, self.checkpoint, self.requeued = signum, checkpoint, requeued
        name = signal.Signals(signum).name if signum else "request"
        then = "the job is requeued" if requeued else "run the same command again to continue"
        super().__init__(f"stopped on {name}; checkpoint {checkpoint}; {then}")


class StopFlag:
    """The signal this rank caught (0 if none), set by a handler and polled by the loop."""

    def __init__(self) -> None:
        self.signum = 0

    def _record(self, signum: int, frame: FrameType | None) -> None:
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
