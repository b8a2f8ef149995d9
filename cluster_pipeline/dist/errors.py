"""The errors a run ends with when a rank is gone or failed, and the exit status each stands for.

Kept apart from the process group so that the CLI and the launcher can name them without
touching torch.distributed.
"""

from __future__ import annotations

from cluster_pipeline.exits import EXIT_RANK_LOST

__all__ = ["EXIT_RANK_LOST"]


class RankLostError(RuntimeError):
    """Another rank is gone (killed, out of memory, its node failed): the run cannot go on."""


class RankFailedError(RuntimeError):
    """Another rank raised an error; the message names that rank and repeats its error.

    `exit_status` is the failing rank's own (2 for bad input: a damaged sample, a bad config
    key), so every rank of a run ends with the status of its cause.
    """

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def exit_status_of(exc: BaseException) -> int:
    """The process exit status an error stands for: its `exit_status` (ConfigError and
    ShardError: 2, bad input), else 1."""
    return int(getattr(exc, "exit_status", 1))


def error_line(exc: BaseException) -> str:
    """The first line of an error, what another rank repeats of it."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
