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
from cluster_pipeline.clustering import kmeans

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
    """`kmeans.Holders` over the ranks of a process group: each method is a collective."""

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
    ) -> kmeans.PCA:
        """The rows sent to rank 0 (sorted by sample index there), fitted, and the PCA
        broadcast: no rank fits its own."""
        sample = dist.gather_rows(self.ctx, index, rows)

        def fit() -> kmeans.PCA:
            assert sample is not None
            return kmeans.fit_pca(sample[1], dim, whiten=whiten, seed=seed, exact=exact)

        fitted = dist.on_rank0(self.ctx, fit)
        d = rows.shape[1]
        mean = dist.broadcast_float32(self.ctx, None if fitted is None else fitted.mean, (d,))
        proj = dist.broadcast_float32(self.ctx, None if fitted is None else fitted.proj, (d, dim))
        return kmeans.PCA(mean=mean, proj=proj, exact=exact)


def cluster_shard(
    ctx: dist.DistContext,
    shard: Shard,
    k: int,
    pca_dim: int = 256,
    whiten: bool = True,
    l2: bool = True,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    split_eps: float = 1e-4,
    use_gpu: bool = True,
) -> kmeans.Clustering:
    """The clustering step of a DeepCluster epoch on features that stay on their rank.

    Returns this rank's rows' labels (row j: sample shard.index[j]), and the centroids, loss
    and number of empty clusters before the split, identical on every rank; spread the labels
    with `dist.all_gather_labels`. Collective: call on every rank.
    """
    counts = dist.all_gather_counts(ctx, len(shard.index))
    skips = dist.all_gather_counts(ctx, len(shard.skipped))
    n = sum(counts)
    if n + sum(skips) != shard.num_samples:
        raise RuntimeError(
            f"extraction produced {n} rows (per rank {counts}) and skipped {sum(skips)} for "
            f"{shard.num_samples} samples"
        )
    if k > n:
        raise ValueError(f"k={k} but only {n} samples were extracted; lower cluster.k")
    gpu = None
    if use_gpu and ctx.device.type == "cuda" and kmeans.num_gpus() > 0:
        gpu = kmeans.GpuSearch(ctx.device.index or 0)  # this rank's GPU only
    return kmeans.cluster(
        Ranks(ctx), shard.index, shard.feats, k, pca_dim, whiten, l2, niter, seed,
        max_points_per_centroid, split_eps, gpu,
    )  # fmt: skip
