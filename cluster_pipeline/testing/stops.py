"""Stops that land at an exact safe point, and what the tests of exact resume compare."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.stop import StopFlag, Stopped


class StopAtPoll(StopFlag):
    """Acts as if SIGTERM arrived just before the `at`-th safe point (the loop polls once
    before each epoch's clustering and once every train.stop_check_every steps)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.polls = at, 0

    def poll(self) -> int:
        self.polls += 1
        return int(signal.SIGTERM) if self.polls >= self.at else 0


def train_rank(rank: int, world: int, config: str, args: list[str], stop_at: int) -> str:
    """`train` with `config` and `args` on this rank of a `run_ranks` world, stopped at poll
    `stop_at` (0: never): "done", or "stopped:<its checkpoint>"."""
    from cluster_pipeline.config import load_config
    from cluster_pipeline.testing.multiproc import next_rendezvous_port
    from cluster_pipeline.training.methods import run_deepcluster

    next_rendezvous_port()
    try:
        run_deepcluster(load_config(config, args), StopAtPoll(stop_at) if stop_at else StopFlag())
    except Stopped as stop:
        return f"stopped:{stop.checkpoint}"
    return "done"


def weights_hash(run_dir: Path, epoch: int) -> str:
    """SHA-256 of the network's weights in the run's checkpoint at the end of `epoch - 1`."""
    state = checkpoint.load(checkpoint.checkpoint_path(run_dir, epoch))
    h = hashlib.sha256()
    for name, t in sorted(state["model"].items()):
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
