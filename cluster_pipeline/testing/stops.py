"""A stop that lands at an exact safe point, for the tests of exact resume."""

from __future__ import annotations

import signal

from cluster_pipeline.run.stop import StopFlag


class StopAtPoll(StopFlag):
    """Acts as if SIGTERM arrived just before the `at`-th safe point (the loop polls once
    before each epoch's clustering and once every train.stop_check_every steps)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.polls = at, 0

    def poll(self) -> int:
        self.polls += 1
        return int(signal.SIGTERM) if self.polls >= self.at else 0
