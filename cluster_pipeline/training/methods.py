"""Every training command is the one loop with a targets strategy."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cluster_pipeline.config import Config
from cluster_pipeline.data.reader import ShardIndex
from cluster_pipeline.run.rundir import run_dir_removed_on_early_error
from cluster_pipeline.run.stop import StopFlag
from cluster_pipeline.training.clusterfit import clusterfit_targets
from cluster_pipeline.training.deepcluster_v2 import DeepClusterV2Targets
from cluster_pipeline.training.loop import run_training
from cluster_pipeline.training.rotnet import rotnet_targets
from cluster_pipeline.training.targets import (
    DeepClusterTargets,
    FixedTargets,
    Targets,
    true_classes,
)

log = logging.getLogger(__name__)

Requeue = Callable[[int], object]


def train_on(cfg: Config, targets: Targets, flag: StopFlag | None, requeue: Requeue | None) -> Path:
    """`run_training`, leaving no run directory behind when a config or data mistake stops it
    before any work. Collective: call on every rank."""
    with run_dir_removed_on_early_error(cfg):
        return run_training(cfg, targets, flag, requeue)


def run_deepcluster(
    cfg: Config, flag: StopFlag | None = None, requeue: Requeue | None = None
) -> Path:
    """`cluster-pipeline train`: DeepCluster, or DeepCluster-v2 (train.method). Collective:
    call on every rank."""
    if cfg.train.method == "deepcluster_v2":
        return train_on(cfg, DeepClusterV2Targets(cfg), flag, requeue)
    return train_on(cfg, DeepClusterTargets(), flag, requeue)


def run_supervised(
    cfg: Config, flag: StopFlag | None = None, requeue: Requeue | None = None
) -> Path:
    """`cluster-pipeline train-supervised`: the network trained on the shards' true classes.

    Collective: call on every rank.
    """

    def num_classes(index: ShardIndex) -> int:
        n = true_classes(index, cfg)[1]
        log.info("supervised: %d samples of %d classes (data.split=%s)",
                 index.num_samples, n, cfg.data.split)  # fmt: skip
        return n

    targets = FixedTargets("classes", num_classes, lambda s: (true_classes(s.index, cfg)[0], None))
    return train_on(cfg, targets, flag, requeue)


def run_rotnet(cfg: Config, flag: StopFlag | None = None, requeue: Requeue | None = None) -> Path:
    """`cluster-pipeline pretrain-rotnet`. Collective: call on every rank."""
    return train_on(cfg, rotnet_targets(cfg), flag, requeue)


def run_clusterfit(
    cfg: Config, flag: StopFlag | None = None, requeue: Requeue | None = None
) -> Path:
    """`cluster-pipeline clusterfit`. Collective: call on every rank."""
    return train_on(cfg, clusterfit_targets(cfg), flag, requeue)
