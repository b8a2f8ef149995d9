"""Features to pseudo-labels on every rank: extract -> gather -> cluster -> broadcast.

`cluster.mode` is decided here and only here, by `place_features`:
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


class Placed(Protocol):
    """Features where clustering needs them: they know who clusters them and how the labels
    reach every rank."""

    def cluster(self, c: ClusterConfig, seed: int) -> kmeans.Clustering | None: ...
    def labels(self, clusters: kmeans.Clustering | None) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class OnRank0:
    """cluster.mode=gather: rank 0 holds N x d and clusters it (`gathered` None elsewhere)."""

    ctx: dist.DistContext
    gathered: Gathered | None
    n: int

    def cluster(self, c: ClusterConfig, seed: int) -> kmeans.Clustering | None:
        return dist.on_rank0(self.ctx, _cluster_gathered, self.gathered, c, seed)

    def labels(self, clusters: kmeans.Clustering | None) -> np.ndarray:
        return broadcast_labels(self.ctx, clusters.labels if clusters else None, self.n)


def _cluster_gathered(gathered: Gathered, c: ClusterConfig, seed: int) -> kmeans.Clustering:
    """Rank 0's clustering of all features read; samples skipped as unreadable get label -1
    (the sampler never draws them)."""
    clusters = kmeans.cluster_features(gathered.feats, c, seed, index=gathered.index)
    return dataclasses.replace(clusters, labels=gathered.per_sample(clusters.labels))


@dataclasses.dataclass(frozen=True)
class OnEveryRank:
    """cluster.mode=sharded: every rank keeps its own rows; nothing holds N x d."""

    ctx: dist.DistContext
    shard: Shard

    def cluster(self, c: ClusterConfig, seed: int) -> kmeans.Clustering | None:
        return cluster_shard(self.ctx, self.shard, c, seed)

    def labels(self, clusters: kmeans.Clustering | None) -> np.ndarray:
        assert clusters is not None  # every rank clusters in sharded mode
        sh = self.shard
        return all_gather_labels(self.ctx, sh.index, clusters.labels, sh.skipped, sh.num_samples)


def place_features(ctx: dist.DistContext, c: ClusterConfig, extracted: Extracted, n: int) -> Placed:
    """The one place where cluster.mode is read. Collective: call on every rank."""
    idx, feats, skipped = extracted
    if c.mode == "sharded":
        return OnEveryRank(ctx, Shard(idx, feats, skipped, n))
    return OnRank0(ctx, gather_features(ctx, idx, feats, n, skipped), n)


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
    with timer("extract"):
        extracted = extract()
    with timer("gather"):
        placed = place_features(ctx, c, extracted, n)
    del extracted  # else the next N x d arrays arrive while these live
    before_clustering()
    with timer("cluster"):
        clusters = placed.cluster(c, seed)
    with timer("broadcast"):
        labels = placed.labels(clusters)
    return labels, clusters
