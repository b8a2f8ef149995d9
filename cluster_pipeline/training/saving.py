"""Three separate pieces: the checkpoint writer, the save policy, and the stop coordinator.

- `Checkpointer` composes the parts into one checkpoint and writes it atomically on rank 0.
- `SavePolicy` says when: every train.checkpoint_every epochs (and the last), every
  train.checkpoint_every_steps steps, and the epoch's assignments.
- `StopCoordinator` agrees across ranks on a caught signal, saves, and raises `Stopped` on
  every rank together. Leaving the process group, closing W&B and requeueing are the entry
  point's teardown (`loop.run_training`), which runs on every exit path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster_pipeline import dist
from cluster_pipeline.config import TrainConfig
from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.stop import StopFlag, Stopped
from cluster_pipeline.training.checkpoints import compose
from cluster_pipeline.training.position import Position

log = logging.getLogger(__name__)


class Checkpointer:
    """Writes the run's checkpoints; `parts()` returns each part's state dict at save time."""

    parts: Callable[[], dict[str, Any]]

    def __init__(
        self,
        run_dir: Path,
        ctx: dist.DistContext,
        config_yaml: str,
        keep: int,
        resumed_at: tuple[int, int] | None = None,
    ) -> None:
        self.run_dir, self.ctx, self.config_yaml = run_dir, ctx, config_yaml
        self.keep, self.last = keep, resumed_at
        # Collective, before each write: brings to rank 0 what `parts` needs from other ranks.
        self.collect: Callable[[], None] = lambda: None

    def save(self, pos: Position, running: torch.Tensor | None = None) -> Path:
        """Write the run at `pos`, on rank 0; a failed write raises on every rank. `running` is
        this rank's (loss, accuracy) sums over its steps of the epoch so far.

        Collective: call on every rank.
        """
        path = checkpoint.checkpoint_path(
            self.run_dir, pos.epoch, pos.step if pos.started else None
        )
        if pos.key == self.last:
            return path
        if pos.started:
            loss, acc = (0.0, 0.0) if running is None else map(float, running)
            pos.loss_sums, pos.acc_sums = (
                np.concatenate(dist.all_gather(self.ctx, np.array([v], np.float64)))
                for v in (loss, acc)
            )
        pos.world = self.ctx.world
        self.collect()
        dist.on_rank0(self.ctx, self._write, path)
        self.last = pos.key
        return path

    def _write(self, path: Path) -> None:
        payload = compose(self.parts(), self.config_yaml)
        checkpoint.save_atomic(payload, path, self.keep)


class SavePolicy:
    """When the run is saved: epoch ends, every N steps, and each epoch's assignments."""

    def __init__(self, cfg: TrainConfig, writer: Checkpointer) -> None:
        self.cfg, self.writer = cfg, writer

    def end_of_epoch(self, pos: Position, assignments: np.ndarray | None) -> None:
        """The finished epoch's `assignments` (when saved), and the state before `pos.epoch`
        starts when due. Collective: call on every rank."""
        t, ctx = self.cfg, self.writer.ctx
        if t.save_assignments and assignments is not None:
            dist.on_rank0(ctx, self._write_assignments, pos.epoch - 1, assignments)
        if pos.epoch == t.epochs or pos.epoch % t.checkpoint_every == 0:
            self.writer.save(pos)

    def _write_assignments(self, epoch: int, labels: np.ndarray) -> None:
        folder = self.writer.run_dir / "assignments"
        folder.mkdir(exist_ok=True)
        np.save(folder / f"epoch-{epoch:04d}.npy", labels.astype(np.int32))

    def at_step(self, pos: Position, running: torch.Tensor) -> None:
        """Between two steps: save every train.checkpoint_every_steps steps.

        Collective: call on every rank, at the same step."""
        every = self.cfg.checkpoint_every_steps
        if every and pos.step and pos.step % every == 0:
            self.writer.save(pos, running)


class StopCoordinator:
    """Stops every rank together, with a checkpoint, when any rank caught a stop signal."""

    def __init__(self, flag: StopFlag, writer: Checkpointer, check_every: int) -> None:
        self.flag, self.writer, self.check_every = flag, writer, check_every

    def at_step(self, pos: Position, running: torch.Tensor) -> None:
        """Every train.stop_check_every steps. Collective: call on every rank, at one step."""
        if pos.step % self.check_every == 0:
            self.stop_if_requested(pos, running)

    def stop_if_requested(self, pos: Position, running: torch.Tensor | None = None) -> None:
        """If any rank caught a signal: save and raise Stopped on every rank.

        Collective: call on every rank."""
        poll = np.array([self.flag.poll()], np.int64)
        signum = int(dist.all_reduce(self.writer.ctx, poll, "max")[0])
        if signum:
            path = self.writer.save(pos, running)
            log.warning("stopping at epoch %d step %d; checkpoint %s", pos.epoch, pos.step, path)
            raise Stopped(signum, str(path))
