"""Where a run stands: the epoch, the steps taken in it, the running sums and the phase times.

With the targets, this is all a resume needs: the sampler's draws are a pure function of
(labels, seed, epoch) and every random draw of a step is keyed by (seed, epoch, rank, step)
(`seeding`), so the position alone restores the sampler and every RNG stream.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cluster_pipeline.data.sampler import SAMPLER_VERSION
from cluster_pipeline.training.checkpoints import to_array, to_tensor

log = logging.getLogger(__name__)


class PhaseTimer:
    """Wall time per named phase of an epoch (synchronizing CUDA so GPU work is counted).

    Each phase's start and end go to the rank's log file (debug level, not to the console), so
    the log of a rank that died or hung ends with where it was.
    """

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = dict(seconds or {})
        self._open: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.debug("phase %s started", name)
        self._open[name] = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] = self.snapshot()[name]
        del self._open[name]
        log.debug("phase %s ended (%.2f s this epoch)", name, self.seconds[name])

    def snapshot(self) -> dict[str, float]:
        """Seconds per phase so far, counting the phases still running."""
        now = time.perf_counter()
        out = dict(self.seconds)
        for name, start in self._open.items():
            out[name] = out.get(name, 0.0) + now - start
        return out


@dataclass
class Position:
    """The epoch, and whether its targets are made (`started`); once started, the training
    steps every rank has taken and each rank's running (loss, accuracy) sums at the last save."""

    epoch: int = 0
    started: bool = False
    step: int = 0
    loss_sums: np.ndarray | None = None
    acc_sums: np.ndarray | None = None
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    world: int = 1  # the world size that took the steps (each rank's share depends on it)
    sampler: int = SAMPLER_VERSION  # the sampler the run draws with (1: started before int32)

    @property
    def key(self) -> tuple[int, int]:
        """(epoch, step), step -1 before the epoch's targets are made: orders checkpoints."""
        return self.epoch, self.step if self.started else -1

    def start(self) -> None:
        self.started, self.step = True, 0

    def next_epoch(self) -> Position:
        return Position(self.epoch + 1, world=self.world, sampler=self.sampler)

    def rank_sums(self, rank: int) -> tuple[float, float]:
        """This rank's running sums of the epoch so far: loss and accuracy over its steps."""
        loss = 0.0 if self.loss_sums is None else float(self.loss_sums[rank])
        return loss, 0.0 if self.acc_sums is None else float(self.acc_sums[rank])

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "started": self.started, "step": self.step,
            "loss_sums": to_tensor(self.loss_sums), "acc_sums": to_tensor(self.acc_sums),
            "seconds": self.timer.snapshot(), "world": self.world, "sampler": self.sampler,
        }  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Position:
        return cls(
            epoch=state["epoch"], started=state["started"], step=state["step"],
            loss_sums=to_array(state["loss_sums"]), acc_sums=to_array(state["acc_sums"]),
            timer=PhaseTimer(state["seconds"]), world=state["world"],
            sampler=state.get("sampler", 1),
        )  # fmt: skip
