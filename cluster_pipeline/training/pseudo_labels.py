"""Features to pseudo-labels on every rank: extract -> gather -> cluster -> broadcast.

`cluster.mode` is decided here and only here, by `clustering_mode`:
- gather: rank 0 gathers every feature, clusters them alone, and broadcasts the labels;
- sharded: the features stay on their rank, the ranks cluster them together (k x d sums per
  iteration) and all-gather the labels.
Both give the same bits on the same features and seed (tests/test_sharded_kmeans.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

from cluster_pipeline import dist
from cluster_pipeline.clustering import kmeans
from cluster_pipeline.clustering.sharded import Shard, cluster_shard
from cluster_pipeline.config import ClusterConfig
from cluster_pipeline.features.gather import (
    Gathered,
    all_gather_labels,
    broadcast_labels,
    gather_features,
)
from cluster_pipeline.training.position import PhaseTimer

# A rank's extraction: (sample indices, features, indices of the samples it could not read).
Extracted = tuple[np.ndarray, np.ndarray, np.ndarray]


class ClusteringMode(Protocol):
    """Where the features go, who clusters them, and how the labels reach every rank."""

    def place(self, extracted: Extracted, n: int) -> object: ...
    def cluster(self, placed: object, c: ClusterConfig, seed: int) -> kmeans.Clustering | None: ...
    def labels(self, clusters: kmeans.Clustering | None, placed: object, n: int) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Gather:
    """cluster.mode=gather: rank 0 holds N x d and clusters it."""

    ctx: dist.DistContext

    def place(self, extracted: Extracted, n: int) -> Gathered | None:
        idx, feats, skipped = extracted
        return gather_features(self.ctx, idx, feats, n, skipped)

    def cluster(self, placed: object, c: ClusterConfig, seed: int) -> kmeans.Clustering | None:
        return dist.on_rank0(self.ctx, _cluster_gathered, placed, c, seed)

    def labels(self, clusters: kmeans.Clustering | None, placed: object, n: int) -> np.ndarray:
        return broadcast_labels(self.ctx, clusters.labels if clusters else None, n)


def _cluster_gathered(gathered: Gathered, c: ClusterConfig, seed: int) -> kmeans.Clustering:
    """Rank 0's clustering of all features read; samples skipped as unreadable get label -1
    (the sampler never draws them)."""
    clusters = kmeans.cluster_features(gathered.feats, c, seed, index=gathered.index)
    return dataclasses.replace(clusters, labels=gathered.per_sample(clusters.labels))


@dataclasses.dataclass(frozen=True)
class Sharded:
    """cluster.mode=sharded: every rank keeps its own rows; nothing holds N x d."""

    ctx: dist.DistContext

    def place(self, extracted: Extracted, n: int) -> Shard:
        idx, feats, skipped = extracted
        return Shard(idx, feats, skipped, n)

    def cluster(self, placed: object, c: ClusterConfig, seed: int) -> kmeans.Clustering | None:
        assert isinstance(placed, Shard)
        return cluster_shard(self.ctx, placed, c, seed)

    def labels(self, clusters: kmeans.Clustering | None, placed: object, n: int) -> np.ndarray:
        assert isinstance(placed, Shard) and clusters is not None
        return all_gather_labels(self.ctx, placed.index, clusters.labels, placed.skipped, n)


def clustering_mode(ctx: dist.DistContext, c: ClusterConfig) -> ClusteringMode:
    """The one place where cluster.mode is read."""
    return Sharded(ctx) if c.mode == "sharded" else Gather(ctx)


def pseudo_labels(
    ctx: dist.DistContext,
    c: ClusterConfig,
    extract: Callable[[], Extracted],
    n: int,
    seed: int,
    timer: PhaseTimer,
    before_clustering: Callable[[], None] = lambda: None,
) -> tuple[np.ndarray, kmeans.Clustering | None]:
    """The pseudo-label of each of the `n` samples (-1: unreadable) on every rank, and the
    clustering (rank 0 in gather mode, every rank in sharded mode). `before_clustering` runs
    once the features are in place (DeepCluster: a safe point to stop).

    Collective: call on every rank.
    """
    mode = clustering_mode(ctx, c)
    with timer("extract"):
        extracted = extract()
    with timer("gather"):
        placed = mode.place(extracted, n)
    del extracted  # else the next N x d arrays arrive while these live
    before_clustering()
    with timer("cluster"):
        clusters = mode.cluster(placed, c, seed)
    with timer("broadcast"):
        labels = mode.labels(clusters, placed, n)
    return labels, clusters
