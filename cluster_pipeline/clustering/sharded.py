"""Sharded k-means (cluster.mode=sharded): each rank clusters the features it extracted, and
only k x d sums, the PCA sample and the labels travel. Nothing holds an N x d matrix.

    PCA fitted on rank 0 from a sample of every rank's rows ──broadcast──▶ project + L2, locally
    ──k initial points chosen by sample index, rows summed over ranks──▶ Lloyd iterations:
        local assignment ──all-reduce of k x (d + 1) int64 sums and counts──▶ new centroids
    ──local assignment of every row──▶ empty-cluster split, decided alike on every rank
    ──all_gather_labels──▶ the N pseudo-labels on every rank

The algorithm is gather mode's, `kmeans.cluster`, with the ranks as its `Holders`: every
choice is keyed by global sample index and every sum is exact, so on the same features and
seed both modes return the same bits, on any number of ranks. The collectives are in `dist`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cluster_pipeline import dist
from cluster_pipeline.clustering import kmeans, pca
from cluster_pipeline.clustering.search import GpuSearch, num_gpus
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


@dataclass(frozen=True)
class Ranks:
    """`holders.Holders` over the ranks of a process group: each method is a collective."""

    ctx: dist.DistContext

    def sum(self, values: np.ndarray) -> np.ndarray:
        if values.dtype == np.int64:
            return dist.all_reduce_sum_int64(self.ctx, values)
        return dist.all_reduce_sum(self.ctx, values.reshape(-1)).reshape(values.shape)

    def max(self, value: float) -> float:
        return dist.all_reduce_max_float(self.ctx, value)

    def concat(self, values: np.ndarray) -> np.ndarray:
        return np.concatenate(dist.all_gather_int64(self.ctx, values))

    def fit_pca(
        self, index: np.ndarray, rows: np.ndarray, dim: int, whiten: bool, seed: int, exact: bool
    ) -> pca.PCA:
        """The rows sent to rank 0 (sorted by sample index there), fitted, and the PCA
        broadcast: no rank fits its own."""
        sample = dist.gather_rows(self.ctx, index, rows)

        def fit() -> pca.PCA:
            assert sample is not None
            return pca.fit_pca(sample[1], dim, whiten=whiten, seed=seed, exact=exact)

        fitted = dist.on_rank0(self.ctx, fit)
        d = rows.shape[1]
        mean = dist.broadcast_float32(self.ctx, None if fitted is None else fitted.mean, (d,))
        proj = dist.broadcast_float32(self.ctx, None if fitted is None else fitted.proj, (d, dim))
        return pca.PCA(mean=mean, proj=proj, exact=exact)


def cluster_shard(
    ctx: dist.DistContext, shard: Shard, c: ClusterConfig, seed: int
) -> kmeans.Clustering:
    """The clustering step of a DeepCluster epoch on features that stay on their rank.

    Returns this rank's rows' labels (row j: sample shard.index[j]), and the centroids, loss
    and number of empty clusters before the split, identical on every rank; spread the labels
    with `dist.all_gather_labels`. `c.use_gpu`: search on this rank's own GPU.

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
    gpu = None
    if c.use_gpu and ctx.device.type == "cuda" and num_gpus() > 0:
        gpu = GpuSearch(ctx.device.index or 0)  # this rank's GPU only
    return kmeans.cluster(Ranks(ctx), shard.index, shard.feats, c, seed, gpu)
