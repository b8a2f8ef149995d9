"""Sharded k-means (cluster.mode=sharded): each rank clusters the features it extracted, and
only k x d sums, the PCA sample and the labels travel. Nothing holds an N x d matrix.

    PCA fitted on rank 0 from a sample of every rank's rows ──broadcast──▶ project + L2, locally
    ──k initial points chosen by sample index, rows summed over ranks──▶ Lloyd iterations:
        local assignment ──all-reduce of k x (d + 1) int64 sums and counts──▶ new centroids
    ──local assignment of every row──▶ empty-cluster split, decided alike on every rank
    ──all_gather_labels──▶ the N pseudo-labels on every rank

Every choice is keyed by global sample index (`kmeans.sample_keys`) and every sum is exact
(fixed-point int64), so the result does not depend on the number of ranks. On the same
features and seed, with N <= k * max_points_per_centroid (no subsampling) and N <=
kmeans.PCA_FIT_MAX_ROWS, it runs the same Lloyd iterations as gather mode
(`kmeans.cluster_features`): same PCA input, same initial centroids; only the centroid sums
differ in their last bits (faiss sums in float32).

The collectives are in `dist`; the arithmetic between them is in `kmeans`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import dist, kmeans

log = logging.getLogger(__name__)

# Rounds of the empty-cluster split before giving up: a round fails for a donor only when its
# points are duplicates and every coin fell on one side (probability <= 1/2 per round).
MAX_SPLIT_ROUNDS = 64


@dataclass(frozen=True)
class Shard:
    """One rank's extraction: row j of `feats` is sample `index[j]`; `skipped` lists the
    samples this rank could not read (data.on_error=skip)."""

    index: np.ndarray  # (n_rank,) int64
    feats: np.ndarray  # (n_rank, d) float32
    skipped: np.ndarray  # int64
    num_samples: int  # N, over all ranks


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
    pca = fit_pca_on_sample(ctx, shard, n, pca_dim, whiten, seed) if pca_dim > 0 else None
    x = kmeans.project(shard.feats, pca, l2)
    gpu = None
    if use_gpu and ctx.device.type == "cuda" and kmeans.num_gpus() > 0:
        gpu = kmeans.GpuIndex(ctx.device.index or 0)  # this rank's GPU only
    centroids = initial_centroids(ctx, x, shard.index, k, seed)
    max_abs = dist.all_reduce_max_float(ctx, max(x.max(initial=0.0), -x.min(initial=0.0)))
    scale = kmeans.fixed_point_scale(max_abs, n)
    train = kmeans.keep_fraction(
        shard.index, k * max_points_per_centroid / n, seed, kmeans.SALT_TRAIN
    )
    x_train = x if train.all() else x[train]  # a copy only when subsampling (k * mppc < N)
    rng = np.random.default_rng([seed, kmeans.SALT_TRAIN])
    centroids = lloyd(ctx, x_train, centroids, niter, scale, rng, gpu)
    labels, _ = kmeans.assign(x, centroids, use_gpu=False, gpu=gpu)
    labels, centroids, n_empty = split_empty_clusters(
        ctx, x, shard.index, labels, centroids, scale, seed, split_eps
    )
    total = dist.all_reduce_sum(ctx, np.array([kmeans.squared_distance_sum(x, centroids, labels)]))
    if n_empty:
        log.info("split %d empty clusters", n_empty)
    return kmeans.Clustering(labels, centroids, float(total[0]) / n, n_empty)


def fit_pca_on_sample(
    ctx: dist.DistContext, shard: Shard, num_rows: int, dim: int, whiten: bool, seed: int
) -> kmeans.PCA:
    """PCA fitted on rank 0 from about kmeans.PCA_FIT_MAX_ROWS rows, each sample kept by its
    key, and broadcast. Below that many rows every row is kept, in sample order: the matrix
    gather mode fits. Collective: call on every rank.
    """
    keep = kmeans.keep_fraction(
        shard.index, kmeans.PCA_FIT_MAX_ROWS / num_rows, seed, kmeans.SALT_PCA
    )
    sample = dist.gather_rows(ctx, shard.index[keep], shard.feats[keep])

    def fit() -> kmeans.PCA:
        assert sample is not None
        return kmeans.fit_pca(sample[1], dim, whiten=whiten, seed=seed)

    fitted = dist.on_rank0(ctx, fit)
    d = shard.feats.shape[1]
    mean = dist.broadcast_float32(ctx, None if fitted is None else fitted.mean, (d,))
    proj = dist.broadcast_float32(ctx, None if fitted is None else fitted.proj, (d, dim))
    return kmeans.PCA(mean=mean, proj=proj)


def initial_centroids(
    ctx: dist.DistContext, x: np.ndarray, index: np.ndarray, k: int, seed: int
) -> np.ndarray:
    """The rows of the k samples `kmeans.initial_indices` picks over all ranks, on every rank:
    each rank offers its own k candidates, then fills the chosen rows it holds into a zero
    k x d matrix that is summed over ranks. Collective: call on every rank.
    """
    offered = dist.all_gather_int64(ctx, kmeans.initial_indices(index, k, seed))
    chosen = kmeans.initial_indices(np.concatenate(offered), k, seed)
    init = np.zeros((k, x.shape[1]), dtype=np.float64)
    at, rows = kmeans.rows_of(index, chosen)
    init[at] = x[rows]
    return dist.all_reduce_sum(ctx, init).astype(np.float32)


def lloyd(
    ctx: dist.DistContext,
    x: np.ndarray,
    centroids: np.ndarray,
    niter: int,
    scale: float,
    rng: np.random.Generator,
    gpu: kmeans.GpuIndex | None = None,
) -> np.ndarray:
    """`niter` Lloyd iterations: assign locally, sum over ranks, move the centroids.

    One all-reduce of k x (d + 1) int64 per iteration. A cluster that empties before the last
    iteration is split the way faiss does it, on the counts alone; after the last one the
    centroids are left as the means, and `split_empty_clusters` fills what is empty then.
    Collective: call on every rank.
    """
    k = len(centroids)
    for it in range(niter):
        labels, _ = kmeans.assign(x, centroids, use_gpu=False, gpu=gpu)
        sums, counts = kmeans.cluster_sums(x, labels, k, scale)
        total = dist.all_reduce_sum_int64(ctx, np.concatenate([sums, counts[:, None]], axis=1))
        centroids = kmeans.centroids_from_sums(total[:, :-1], total[:, -1], scale, centroids)
        if it < niter - 1:
            centroids, _, _ = kmeans.split_empty_centroids(centroids, total[:, -1], rng)
    return centroids


def split_empty_clusters(
    ctx: dist.DistContext,
    x: np.ndarray,
    index: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    scale: float,
    seed: int,
    eps: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, int]:
    """DeepCluster's split (`kmeans.split_empty_clusters`) with every rank moving its own
    points and deciding alike.

    The donor and the perturbation come from the global sizes and a generator seeded alike on
    every rank. The donor's points go to the nearer of the two perturbed centroids; when that
    leaves one side empty (duplicates), they go by a coin keyed by sample index instead of in
    random halves, and when the coins fall on one side too, the empty cluster waits for the next
    round (fresh coins). One all-reduce of 4 x (d + 1) int64 per split. Returns (labels,
    centroids, number empty before). Collective: call on every rank.
    """
    k, d = centroids.shape
    labels, centroids = labels.copy(), centroids.copy()
    sizes = dist.all_reduce_sum_int64(ctx, np.bincount(labels, minlength=k))
    if sizes.sum() < k:
        raise ValueError(f"cannot fill {k} clusters from {sizes.sum()} points")
    rng = np.random.default_rng(seed)
    n_empty = int((sizes == 0).sum())
    for attempt in range(MAX_SPLIT_ROUNDS):
        empty = np.flatnonzero(sizes == 0)
        if not len(empty):
            return labels, centroids, n_empty
        for e in empty.tolist():
            donor = kmeans.choose_donor(sizes, rng)
            members = np.flatnonzero(labels == donor)
            pair = kmeans.perturbed_pair(centroids[donor], eps, rng)
            sides = (
                kmeans.closer_to_first(x[members], pair),
                kmeans.coin(index[members], seed, salt=attempt * k + e),
            )
            parts = [
                kmeans.cluster_sums(x[members], (~s).astype(np.int64), 2, scale) for s in sides
            ]
            packed = np.concatenate([np.concatenate([s, c[:, None]], axis=1) for s, c in parts])
            total = dist.all_reduce_sum_int64(ctx, packed).reshape(2, 2, d + 1)
            for side, sums in zip(sides, total, strict=True):
                if sums[0, -1] and sums[1, -1]:  # both halves non-empty
                    labels[members[side]] = e
                    both = np.array([e, donor])
                    centroids[both] = kmeans.centroids_from_sums(
                        sums[:, :-1], sums[:, -1], scale, centroids[both]
                    )
                    sizes[e], sizes[donor] = sums[:, -1]
                    break
    raise RuntimeError(
        f"{int((sizes == 0).sum())} clusters still empty after {MAX_SPLIT_ROUNDS} rounds of "
        f"splitting (k={k}, {sizes.sum()} points): every coin fell on one side, which should "
        "not happen"
    )
