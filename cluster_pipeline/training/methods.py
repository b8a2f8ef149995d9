"""Every training command is the one loop with a targets strategy."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cluster_pipeline.config import Config
from cluster_pipeline.data.reader import ShardIndex
from cluster_pipeline.run.stop import StopFlag
from cluster_pipeline.training.clusterfit import clusterfit_targets
from cluster_pipeline.training.loop import run_training
from cluster_pipeline.training.rotnet import rotnet_targets
from cluster_pipeline.training.targets import DeepClusterTargets, FixedTargets, true_classes

log = logging.getLogger(__name__)

Requeue = Callable[[int], object]


def run_deepcluster(
    cfg: Config, flag: StopFlag | None = None, requeue: Requeue | None = None
) -> Path:
    """`cluster-pipeline train`: DeepCluster. Collective: call on every rank."""
    return run_training(cfg, DeepClusterTargets(), flag, requeue)


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
    return run_training(cfg, targets, flag, requeue)


def run_rotnet(cfg: Config, flag: StopFlag | None = None, requeue: Requeue | None = None) -> Path:
    """`cluster-pipeline pretrain-rotnet`. Collective: call on every rank."""
    return run_training(cfg, rotnet_targets(cfg), flag, requeue)


def run_clusterfit(
    cfg: Config, flag: StopFlag | None = None, requeue: Requeue | None = None
) -> Path:
    """`cluster-pipeline clusterfit`. Collective: call on every rank."""
    return run_training(cfg, clusterfit_targets(cfg), flag, requeue)
