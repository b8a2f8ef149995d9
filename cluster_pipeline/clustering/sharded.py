"""Sharded k-means (cluster.mode=sharded): each rank clusters the features it extracted, and
only k x d sums, the PCA sample and the labels travel. Nothing holds an N x d matrix.

    PCA fitted on rank 0 from a sample of every rank's rows ──broadcast──▶ project + L2, locally
    ──k initial points chosen by sample index, rows summed over ranks──▶ Lloyd iterations:
        local assignment ──all-reduce of k x (d + 1) int64 sums and counts──▶ new centroids
    ──local assignment of every row──▶ empty-cluster split, decided alike on every rank
    ──all_gather_labels──▶ the N pseudo-labels on every rank

The algorithm is gather mode's, `kmeans.cluster`, with the ranks as its `Holders`: every
choice is keyed by global sample index and every sum is exact, so on the same features and
seed both modes return the same bits, on any number of ranks. The reductions are `ranks.Ranks`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cluster_pipeline import dist
from cluster_pipeline.clustering import kmeans
from cluster_pipeline.clustering.ranks import Ranks
from cluster_pipeline.config import ClusterConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One rank's extraction: row j of `feats` is sample `index[j]`; `skipped` lists the
    samples this rank could not read (data.on_error=skip)."""

    index: np.ndarray  # (n_rank,) int64
    feats: np.ndarray  # (n_rank, d) float32
    skipped: np.ndarray  # int64
    num_samples: int  # N, over all ranks


def cluster_shard(
    ctx: dist.DistContext, shard: Shard, c: ClusterConfig, seed: int
) -> kmeans.Clustering:
    """The clustering step of a DeepCluster epoch on features that stay on their rank.

    Returns this rank's rows' labels (row j: sample shard.index[j]), and the centroids, loss
    and number of empty clusters before the split, identical on every rank; spread the labels
    with `features.gather.all_gather_labels`. `c.use_gpu`: cluster on this rank's own GPU
    (cluster.backend: faiss's search, or torch's Lloyd's iterations there).

    Collective: call on every rank.
    """
    counts = dist.all_gather_counts(ctx, len(shard.index))
    skips = dist.all_gather_counts(ctx, len(shard.skipped))
    n = sum(counts)
    if n + sum(skips) != shard.num_samples:
        raise RuntimeError(
            f"extraction produced {n} rows (per rank {counts}) and skipped {sum(skips)} for "
            f"{shard.num_samples} samples"
        )
    gpu = (ctx.device.index or 0) if ctx.device.type == "cuda" else None  # this rank's own
    engine = kmeans.make_engine(c, gpu, all_gpus=False)
    return kmeans.cluster(Ranks(ctx), shard.index, shard.feats, c, seed, engine)
