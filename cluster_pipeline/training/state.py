"""A run's state: what a checkpoint holds, when one is written, and how a run continues from it.

A checkpoint is written at the end of every `train.checkpoint_every` epochs, every
`train.checkpoint_every_steps` training steps, and when the ranks agree to stop on a signal.
It holds the model, the optimizer (momentum and learning rates), the position (epoch, step),
this epoch's pseudo-labels and centroids, the previous epoch's labels, each rank's running
loss and accuracy sums, the W&B run id and the resolved config; a run on fixed targets
(supervised, RotNet, ClusterFit) also holds its targets, so a resume never recomputes them
(ClusterFit's clustering). The sampler's draws are a pure function of
(labels, seed, epoch), and every random draw of a training step is seeded by (seed, epoch,
rank, step) (see `train.seed_step`), so the position alone restores the sampler and every RNG
stream: a resumed run repeats the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from cluster_pipeline import dist
from cluster_pipeline.clustering.kmeans import Clustering
from cluster_pipeline.config import Config, ConfigError, to_yaml
from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.stop import StopFlag, Stopped
from cluster_pipeline.run.tracking import Tracker, truncate_metrics

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
class EpochState:
    """Where the run stands within an epoch.

    Before the epoch is clustered `labels` is None and `step` is 0. Once clustered, `labels`
    are its pseudo-labels (on every rank), `kmeans` summarizes the clustering (rank 0), and
    `step` counts the training steps that every rank has taken. `fixed_labels` are the targets
    of a run that trains on the same labels every epoch (None for DeepCluster).
    """

    epoch: int = 0
    labels: np.ndarray | None = None
    prev_labels: np.ndarray | None = None
    kmeans: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    loss_sums: np.ndarray | None = None
    acc_sums: np.ndarray | None = None
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    fixed_labels: np.ndarray | None = None
    # What the head's outputs are: "clusters" (DeepCluster, ClusterFit), "classes" (the shards'
    # true classes, train-supervised) or "rotations" (RotNet); analyses name outputs by it.
    head: str = "clusters"

    @property
    def clustered(self) -> bool:
        return self.labels is not None

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.step if self.clustered else -1

    def start_training(self, labels: np.ndarray, clusters: Clustering | None) -> None:
        self.labels, self.step = labels, 0
        if clusters is not None:
            self.kmeans = {
                "loss": clusters.loss,
                "n_empty_before_split": clusters.n_empty_before_split,
                "k": len(clusters.centroids),
                "centroids": torch.from_numpy(clusters.centroids),
            }

    def rank_sums(self, rank: int) -> tuple[float, float]:
        """This rank's running sums of the epoch so far: loss and accuracy over its steps."""
        loss = 0.0 if self.loss_sums is None else float(self.loss_sums[rank])
        return loss, 0.0 if self.acc_sums is None else float(self.acc_sums[rank])

    def next_epoch(self) -> EpochState:
        if self.fixed_labels is not None:  # the same targets again; no previous epoch's to keep
            return EpochState(self.epoch + 1, fixed_labels=self.fixed_labels, head=self.head)
        return EpochState(self.epoch + 1, prev_labels=self.labels)

    def to_checkpoint(self) -> dict[str, Any]:
        def tensor(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

        return {
            "epoch": self.epoch,
            "step": self.step,
            "labels": tensor(self.labels),
            "prev_labels": tensor(self.prev_labels),
            "kmeans": self.kmeans,
            "loss_sums": tensor(self.loss_sums),
            "acc_sums": tensor(self.acc_sums),
            "seconds": self.timer.snapshot(),
            "fixed_labels": tensor(self.fixed_labels),
            "head": self.head,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> EpochState:
        def array(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.numpy()

        return cls(
            epoch=ckpt["epoch"],
            labels=array(ckpt["labels"]),
            prev_labels=array(ckpt["prev_labels"]),
            kmeans=ckpt["kmeans"],
            step=ckpt["step"],
            loss_sums=array(ckpt["loss_sums"]),
            acc_sums=array(ckpt.get("acc_sums")),
            timer=PhaseTimer(ckpt["seconds"]),
            fixed_labels=array(ckpt.get("fixed_labels")),
            head=ckpt.get("head", "clusters"),
        )


def resume_state(
    run_dir: Path,
    cfg: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: dist.DistContext,
) -> tuple[EpochState, str | None, tuple[int, int] | None]:
    """The run directory's newest readable checkpoint loaded into model and optimizer, if any.

    Returns the state to continue from, the W&B run id to continue logging into, and the
    position of the checkpoint loaded (None for a new run).
    """
    if not checkpoint.list_checkpoints(run_dir):
        return EpochState(), None, None
    if not cfg.run.resume:
        raise ConfigError(
            f"run directory {run_dir} already has checkpoints and run.resume=false; "
            "choose another run.dir or set run.resume=true to continue it"
        )
    ckpt = checkpoint.load_latest(run_dir)
    if ckpt is None:
        raise RuntimeError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
    state = EpochState.from_checkpoint(ckpt)
    if state.clustered and ckpt["world"] != ctx.world:
        raise ConfigError(
            f"the checkpoint of {run_dir} was written within epoch {state.epoch} by "
            f"{ckpt['world']} ranks; resume it with {ckpt['world']} ranks (this run has "
            f"{ctx.world}): each rank's share of the epoch depends on the world size"
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ctx.is_main:
        truncate_metrics(run_dir, state.epoch)
    where = f"step {state.step} of epoch {state.epoch}" if state.clustered else "its start"
    log.info("resumed %s at epoch %d, %s", run_dir, state.epoch, where)
    return state, ckpt["wandb_id"] or None, state.position


class Checkpointer:
    """Writes the run's checkpoints, and stops every rank together when one caught a signal.

    `requeue(signum)` runs on rank 0 once the stop checkpoint is written and every rank has
    left the process group (under SLURM: submitit's checkpoint() and `scontrol requeue`; it
    raises if the job cannot be requeued); None stops without a requeue.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        ctx: dist.DistContext,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        tracker: Tracker,
        flag: StopFlag,
        requeue: Callable[[int], object] | None = None,
        resumed_at: tuple[int, int] | None = None,
    ) -> None:
        self.run_dir, self.cfg, self.ctx = run_dir, cfg, ctx
        self.model, self.optimizer, self.tracker = model, optimizer, tracker
        self.flag, self.requeue = flag, requeue
        self.last = resumed_at

    def save(self, state: EpochState, running: torch.Tensor | None = None) -> Path:
        """Write the state, on rank 0; a failed write raises on every rank. `running` is this
        rank's (loss, accuracy) sums over its steps of the epoch so far.

        Collective: call on every rank.
        """
        path = checkpoint.checkpoint_path(
            self.run_dir, state.epoch, state.step if state.clustered else None
        )
        if state.position == self.last:
            return path
        if state.clustered:
            loss, acc = (0.0, 0.0) if running is None else map(float, running)
            state.loss_sums = dist.all_gather_floats(self.ctx, loss)
            state.acc_sums = dist.all_gather_floats(self.ctx, acc)
        dist.on_rank0(self.ctx, self._write, state, path)
        self.last = state.position
        return path

    def _write(self, state: EpochState, path: Path) -> None:
        payload = state.to_checkpoint() | {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "world": self.ctx.world,
            "wandb_id": self.tracker.run_id or "",
            "config": to_yaml(self.cfg),
        }
        checkpoint.save_atomic(payload, path, self.cfg.train.keep_checkpoints)

    def end_of_epoch(self, state: EpochState) -> None:
        """Save the finished epoch's assignments (not fixed targets: their command saves them
        once), and the state before `state.epoch` starts when due. Collective: call on every
        rank."""
        t = self.cfg.train
        if t.save_assignments and state.fixed_labels is None:
            dist.on_rank0(self.ctx, self._write_assignments, state.epoch - 1, state.prev_labels)
        if state.epoch == t.epochs or state.epoch % t.checkpoint_every == 0:
            self.save(state)

    def _write_assignments(self, epoch: int, labels: np.ndarray | None) -> None:
        assert labels is not None
        folder = self.run_dir / "assignments"
        folder.mkdir(exist_ok=True)
        np.save(folder / f"epoch-{epoch:04d}.npy", labels.astype(np.int32))

    def at_step(self, state: EpochState, running: torch.Tensor) -> None:
        """Between two training steps: stop if a rank caught a signal, save if due.

        Collective: call on every rank, at the same step.
        """
        t = self.cfg.train
        if state.step % t.stop_check_every == 0:
            self.stop_if_requested(state, running)
        if t.checkpoint_every_steps and state.step and state.step % t.checkpoint_every_steps == 0:
            self.save(state, running)

    def stop_if_requested(self, state: EpochState, running: torch.Tensor | None = None) -> None:
        """If any rank caught a stop signal: save, requeue, leave the process group, raise
        Stopped on every rank. Collective: call on every rank."""
        signum = dist.max_over_ranks(self.ctx, self.flag.poll())
        if signum:
            self._stop(signum, state, running)

    def _stop(self, signum: int, state: EpochState, running: torch.Tensor | None) -> NoReturn:
        path = self.save(state, running)
        log.warning("stopping at epoch %d step %d; checkpoint %s", state.epoch, state.step, path)
        if self.ctx.is_main:
            self.tracker.finish()
        dist.barrier(self.ctx)
        dist.shutdown(self.ctx)
        # Last: under SLURM a requeue kills the job's processes at once, so nothing may follow
        # it that needs a peer, W&B's service process or a flush.
        if self.requeue is not None and self.ctx.is_main:
            self.requeue(signum)
        raise Stopped(signum, str(path), requeued=self.requeue is not None)
