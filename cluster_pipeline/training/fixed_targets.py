"""Training on targets that stay fixed for the whole run: supervised, RotNet and ClusterFit.

All three train a network on one label per sample, drawn uniformly over labels as DeepCluster
draws its clusters: true classes (`train-supervised`), cluster labels computed once
(`clusterfit`), or one label for every sample plus a batch transform that makes the real
targets (`pretrain-rotnet`). The loop is DeepCluster's without the clustering: the same
`train_one_epoch`, checkpoints, exact resume and metrics, and a head that is initialised once
rather than reset every epoch. The targets go into every checkpoint, so a resumed run trains on
the targets it started with without recomputing them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster_pipeline import dist
from cluster_pipeline.config import Config, ConfigError
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.features.extract import open_data_and_model
from cluster_pipeline.models.nets import ClusterNet, reset_head
from cluster_pipeline.run.rundir import prepare_run_dir
from cluster_pipeline.run.stop import StopFlag
from cluster_pipeline.training.loop import (
    BatchTransform,
    finish_run,
    open_training,
    print_epoch_row,
    train_one_epoch,
    training_row,
)

log = logging.getLogger(__name__)


def train_on_targets(
    cfg: Config,
    ctx: dist.DistContext,
    run_dir: Path,
    reader: SampleReader,
    model: ClusterNet,
    targets: np.ndarray | None,
    flag: StopFlag,
    requeue: Callable[[int], object] | None = None,
    transform: BatchTransform | None = None,
    summary: dict[str, Any] | None = None,
    head: str = "clusters",
) -> Path:
    """Train `model` (its head already sized) on `targets` (per sample; -1: never drawn) for
    cfg.train.epochs, continuing the run directory's last checkpoint with the targets it holds
    (`targets` may then be None). `summary` (rank 0: how the targets were made) goes to the
    W&B run's summary; `head` says what the outputs are (state.EpochState.head).
    Collective: call on every rank.
    """
    ddp, optimizer, state, tracker, saver = open_training(run_dir, cfg, ctx, model, flag, requeue)
    if summary:
        tracker.log_summary(summary)
    if state.fixed_labels is None:
        if targets is None:
            raise RuntimeError(f"no targets to train on: {run_dir} has no checkpoint holding them")
        state.fixed_labels = np.ascontiguousarray(targets, dtype=np.int64)
        state.head = head
        state.start_training(state.fixed_labels, None)
        saver.save(state)  # the targets are in a checkpoint before the first step
    first = state.epoch
    while state.epoch < cfg.train.epochs:
        if not state.clustered:
            state.start_training(state.fixed_labels, None)
        with state.timer("train"):
            totals = train_one_epoch(ddp, optimizer, reader, state, cfg, ctx, saver, transform)
        if ctx.is_main:
            row = training_row(state, totals)
            tracker.log_epoch(row)
            print_epoch_row(row, state.epoch == first, COLUMNS)
        state = state.next_epoch()
        with state.timer("checkpoint"):
            saver.end_of_epoch(state)
    finish_run(run_dir, ctx, tracker, state.fixed_labels)
    return run_dir


def fresh_head(model: ClusterNet, outputs: int, seed: int) -> None:
    """A head of `outputs` classes, initialised once for the run (DeepCluster's N(0, 0.01))."""
    model.set_head(outputs)
    model.head.to(next(model.parameters()).device)
    reset_head(model, torch.Generator().manual_seed(seed))


# (metrics key, column title, decimals) of the table printed on rank 0, one row per epoch.
COLUMNS = (
    ("epoch", "epoch", 0), ("train_loss", "loss", 4), ("train_acc", "acc", 4),
    ("images_per_s", "img/s", 0), ("time_train_s", "train_s", 1),
)  # fmt: skip


def true_classes(index: ShardIndex, cfg: Config) -> tuple[np.ndarray, int]:
    """The shards' classes and their number (len(index.classes), else the largest + 1)."""
    labels = index.labels
    if labels is None:
        raise ConfigError(
            f"the shards in data.shards={cfg.data.shards} have no class label for some samples "
            "(samples.npy column 3 is -1): train-supervised needs labelled shards; write them "
            "with make-shards from a labelled source (mnist5k, digits, imagefolder:PATH)"
        )
    return labels, max(len(index.classes), int(labels.max()) + 1)


def run_supervised(
    cfg: Config, flag: StopFlag | None = None, requeue: Callable[[int], object] | None = None
) -> Path:
    """`cluster-pipeline train-supervised`: the network trained on the shards' true classes.

    Collective: call on every rank.
    """
    ctx = dist.init_distributed(cfg.dist.timeout_s, cfg.dist.heartbeat_timeout_s)
    with dist.naming_lost_ranks(ctx):
        run_dir = prepare_run_dir(cfg, ctx)
        index, reader, model = open_data_and_model(cfg, ctx, clusters=False)
        labels, num_classes = true_classes(index, cfg)
        fresh_head(model, num_classes, cfg.train.seed)
        log.info("supervised: %d samples of %d classes (data.split=%s)",
                 index.num_samples, num_classes, cfg.data.split)  # fmt: skip
        return train_on_targets(cfg, ctx, run_dir, reader, model, labels, flag or StopFlag(),
                                requeue, head="classes")  # fmt: skip
