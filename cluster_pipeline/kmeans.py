"""Clustering as pure functions on NumPy arrays: PCA-whitening, faiss k-means, full assignment, and
DeepCluster's empty-cluster split. Nothing here knows about torch or torch.distributed.

The pieces that `sharded_kmeans` runs on every rank between its collectives live here too:
per-sample keys (seeded choices by global sample index, so no choice depends on the number of
ranks), local assignment, per-cluster sums in exact fixed point, the centroid update, and the
split decisions, which read only cluster sizes and a shared seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)

# PCA is fitted on at most this many rows: the covariance is well estimated long before 1M rows.
PCA_FIT_MAX_ROWS = 200_000
ASSIGN_CHUNK_ROWS = 262_144
SUM_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class PCA:
    mean: np.ndarray  # (d_in,)
    proj: np.ndarray  # (d_in, d_out); columns scaled by 1/sqrt(eigenvalue) when whitening

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), self.proj.shape[1]), dtype=np.float32)
        for s in range(0, len(x), ASSIGN_CHUNK_ROWS):
            out[s : s + ASSIGN_CHUNK_ROWS] = (x[s : s + ASSIGN_CHUNK_ROWS] - self.mean) @ self.proj
        return out


def fit_pca(x: np.ndarray, dim: int, whiten: bool = True, eps: float = 1e-5, seed: int = 0) -> PCA:
    """Top-`dim` principal directions of `x`, optionally scaled to unit variance (whitening)."""
    n, d = x.shape
    if not 0 < dim <= d:
        raise ValueError(f"PCA dimension {dim} must be in 1..{d} (the feature dimension)")
    if n > PCA_FIT_MAX_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(n, PCA_FIT_MAX_ROWS, replace=False))
        x = x[rows]
    mean = x.mean(axis=0, dtype=np.float64)
    xc = x - mean.astype(np.float32)  # float32: centering in float64 doubles PCA's time
    cov = (xc.T @ xc).astype(np.float64) / max(1, len(xc) - 1)
    evals, evecs = np.linalg.eigh(cov)
    top = np.argsort(evals)[::-1][:dim]
    proj = evecs[:, top]
    if whiten:
        proj = proj / np.sqrt(np.maximum(evals[top], 0.0) + eps)
    return PCA(mean=mean.astype(np.float32), proj=proj.astype(np.float32))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def project(x: np.ndarray, pca: PCA | None, l2: bool = True) -> np.ndarray:
    """Rows through a fitted PCA (None: unchanged), then L2-normalized; row by row, so a rank
    that projects its own rows gets the bits rank 0 would get for them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if pca is not None:
        x = pca.apply(x)  # a new array
    elif l2:
        x = x.copy()  # never normalize the caller's features in place
    if l2:  # in place and in chunks: one N x d array at a time, not three
        for s in range(0, len(x), ASSIGN_CHUNK_ROWS):
            chunk = x[s : s + ASSIGN_CHUNK_ROWS]
            chunk /= np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12)
    return x


def pca_whiten(
    x: np.ndarray, dim: int, whiten: bool = True, l2: bool = True, seed: int = 0
) -> np.ndarray:
    """DeepCluster's preprocessing: PCA to `dim` (0 keeps all), whitening, L2 normalization."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    pca = fit_pca(x, dim, whiten=whiten, seed=seed) if dim > 0 else None
    return project(x, pca, l2)


# ------------------------------------------------------------- seeded choices by sample index

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose outputs look independent."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def sample_keys(index: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """A pseudo-random uint64 for each global sample index, a pure function of (index, seed,
    salt): whichever rank holds a sample computes the same key for it, so choices made by key
    (initial centroids, samples, coins) do not depend on the number of ranks."""
    base = np.array([seed & (2**64 - 1), salt & (2**64 - 1)], dtype=_U64)
    with np.errstate(over="ignore"):
        offset = _splitmix64(_splitmix64(base[:1] * _GOLDEN) + base[1:] * _GOLDEN)
        return _splitmix64(np.asarray(index).astype(_U64) * _GOLDEN + offset[0])


# Salts of the different choices made from one seed.
SALT_INIT, SALT_PCA, SALT_TRAIN, SALT_COIN, SALT_SPLIT = 1, 2, 3, 4, 5


def initial_indices(index: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The sample indices of the k initial centroids: the k smallest keys, in key order.

    Both modes use this rule. A rank's candidates are its own k smallest, and the k smallest of
    the union of every rank's candidates are the global k smallest, whatever the world size.
    """
    index = np.unique(np.asarray(index, dtype=np.int64))
    keys = sample_keys(index, seed, SALT_INIT)
    return index[np.lexsort((index, keys))[:k]]


def rows_of(index: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in `wanted`, rows of `index`) of the wanted samples that `index` holds."""
    index, wanted = np.asarray(index, np.int64), np.asarray(wanted, np.int64)
    if not len(index):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(index, kind="stable")
    at = np.searchsorted(index, wanted, sorter=order).clip(0, len(index) - 1)
    found = np.flatnonzero(index[order[at]] == wanted)
    return found, order[at[found]]


def keep_fraction(index: np.ndarray, fraction: float, seed: int, salt: int) -> np.ndarray:
    """Mask of the samples whose key falls below `fraction` of the key range: a uniform sample
    of about fraction * N samples, chosen by index so that no rank's share matters."""
    if fraction >= 1.0:
        return np.ones(len(index), dtype=bool)
    return sample_keys(index, seed, salt) < _U64(int(fraction * 2.0**64))


def num_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    use_gpu: bool = True,
    init_centroids: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """faiss k-means; returns (k, d) centroids and the final training objective.

    On a machine with GPUs faiss shards the work over all of them; faiss trains on at most
    k * max_points_per_centroid points, so use `assign` for the labels of all points.
    `init_centroids` (k, d) replaces faiss's own choice of k random training points.
    """
    n, d = x.shape
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} points to cluster")
    gpus = num_gpus() if use_gpu else 0
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
        gpu=gpus if gpus > 0 else False,
        verbose=False,
    )
    init = None if init_centroids is None else np.ascontiguousarray(init_centroids, np.float32)
    km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=init)
    objective = np.asarray(km.obj if km.obj is not None else [np.nan])
    obj = float(objective[-1])
    return np.ascontiguousarray(km.centroids, dtype=np.float32), obj


def assign(
    x: np.ndarray, centroids: np.ndarray, use_gpu: bool = True, gpu: GpuIndex | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of every point: (labels int64, squared distances float32).

    `gpu` searches on that one GPU (a rank's own, in sharded mode); otherwise `use_gpu` means
    every GPU of the machine, as rank 0 uses them in gather mode.
    """
    index: faiss.Index
    if gpu is not None:
        index = gpu.index(centroids.shape[1])
    else:
        index = faiss.IndexFlatL2(centroids.shape[1])
        gpus = num_gpus() if use_gpu else 0
        if gpus > 0:
            index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), ASSIGN_CHUNK_ROWS):
        dd, ii = index.search(np.ascontiguousarray(x[s : s + ASSIGN_CHUNK_ROWS]), 1)
        labels[s : s + len(ii)] = ii[:, 0]
        dist[s : s + len(dd)] = dd[:, 0]
    return labels, dist


class GpuIndex:
    """faiss's resources on one GPU, made once and reused by every assignment of a k-means run
    (each StandardGpuResources reserves scratch memory on the device)."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.resources = faiss.StandardGpuResources()

    def index(self, d: int) -> faiss.Index:
        return faiss.index_cpu_to_gpu(self.resources, self.device, faiss.IndexFlatL2(d))


# ------------------------------------------------------------ Lloyd steps in exact fixed point


def fixed_point_scale(max_abs: float, num_points: int) -> float:
    """The power of two by which coordinates are scaled to int64 so that a sum over
    `num_points` points of magnitude up to `max_abs` cannot overflow.

    Integer sums are exact and do not depend on their order, so per-cluster sums reduced over
    any number of ranks (or GPU threads) are bit-identical. At N = 1e9 and |x| <= 1 (L2) the
    resolution is 2**-31 (float32 resolves 2**-28 at 1/sqrt(256), a typical coordinate).
    """
    bits = 61 - int(np.ceil(np.log2(max(num_points, 1) + 1)))
    bits -= int(np.ceil(np.log2(max_abs))) if max_abs > 0 else 0
    return float(2.0 ** min(bits, 60))


def cluster_sums(
    x: np.ndarray, labels: np.ndarray, k: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of the rows (int64: coordinates times `scale`, rounded) and counts.

    Rows are visited in cluster order, SUM_CHUNK_ROWS at a time, so the float64 and int64
    copies stay small (allocating them whole costs more than the arithmetic).
    """
    sums = np.zeros((k, x.shape[1]), dtype=np.int64)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    order = np.argsort(labels, kind="stable")
    by_cluster = labels[order]
    for s in range(0, len(x), SUM_CHUNK_ROWS):
        q = np.multiply(x[order[s : s + SUM_CHUNK_ROWS]], scale, dtype=np.float64)
        present, starts = np.unique(by_cluster[s : s + SUM_CHUNK_ROWS], return_index=True)
        sums[present] += np.add.reduceat(np.rint(q, out=q).astype(np.int64), starts, axis=0)
    return sums, counts


def centroids_from_sums(
    sums: np.ndarray, counts: np.ndarray, scale: float, previous: np.ndarray
) -> np.ndarray:
    """Means of the clusters from their global sums; an empty cluster keeps its centroid."""
    out = previous.astype(np.float32, copy=True)
    full = counts > 0
    out[full] = (sums[full].astype(np.float64) / scale / counts[full, None]).astype(np.float32)
    return out


def split_empty_centroids(
    centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """faiss's fix for a cluster that empties during the Lloyd iterations, decided on the
    cluster sizes alone (so every rank decides alike): the empty cluster takes a copy of a
    cluster picked with probability proportional to its size minus one, the two copies are
    pushed apart by a relative 1/1024, and the next assignment separates their points.
    Returns (centroids, counts as the split assumes them, number split).
    """
    centroids, counts = centroids.copy(), counts.copy()
    eps = np.float32(1 / 1024)
    signs = np.where(np.arange(centroids.shape[1]) % 2 == 0, eps, -eps).astype(np.float32)
    empty = np.flatnonzero(counts == 0)
    for e in empty:
        weight = np.maximum(counts - 1, 0).astype(np.float64)
        if weight.sum() == 0:
            break
        donor = int(rng.choice(len(counts), p=weight / weight.sum()))
        centroids[e] = centroids[donor] * (1 + signs)
        centroids[donor] = centroids[donor] * (1 - signs)
        counts[e] = counts[donor] // 2
        counts[donor] -= counts[e]
    return centroids, counts, len(empty)


# ------------------------------------------------------------- DeepCluster's empty-cluster split


def choose_donor(sizes: np.ndarray, rng: np.random.Generator) -> int:
    """A cluster to split, with probability proportional to its size among those with >= 2."""
    splittable = np.where(sizes >= 2, sizes, 0).astype(np.float64)
    return int(rng.choice(len(sizes), p=splittable / splittable.sum()))


def perturbed_pair(centroid: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """(2, d): the donor's centroid pushed +eps (for the empty cluster) and -eps (the donor)."""
    noise = eps * rng.standard_normal(len(centroid), dtype=np.float32)
    scale = np.abs(centroid).mean() + eps
    return np.stack([centroid + noise * scale, centroid - noise * scale])


def closer_to_first(x: np.ndarray, pair: np.ndarray) -> np.ndarray:
    """Which rows are nearer to pair[0] than to pair[1]."""
    d2 = ((x[:, None, :] - pair[None, :, :]) ** 2).sum(-1)
    return d2[:, 0] < d2[:, 1]


def coin(index: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A fair coin per global sample index: splits duplicates the same way on any world size."""
    return (sample_keys(index, seed, SALT_COIN + (salt << 8)) >> _U64(63)).astype(bool)


def split_empty_clusters(
    x: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    rng: np.random.Generator,
    eps: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, int]:
    """DeepCluster's fix for empty clusters, applied until none is empty (needs N >= k).

    For each empty cluster: pick a non-empty cluster with probability proportional to its size
    (among those with at least two points, which exist while any cluster is empty and N >= k),
    give the empty cluster a copy of its centroid perturbed by +eps and the donor -eps, and split
    the donor's points between the two by nearest centroid. When the perturbation does not
    separate them (duplicate points), the points are split in two random halves. Both centroids
    are then moved to the mean of their points. Returns (labels, centroids, empty count before).
    """
    labels = labels.copy()
    centroids = centroids.copy()
    k = len(centroids)
    if len(x) < k:
        raise ValueError(f"cannot fill {k} clusters from {len(x)} points")
    sizes = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(sizes == 0)
    for e in empty:
        donor = choose_donor(sizes, rng)
        members = np.flatnonzero(labels == donor)
        to_new = closer_to_first(x[members], perturbed_pair(centroids[donor], eps, rng))
        if to_new.all() or not to_new.any():
            to_new = np.zeros(len(members), dtype=bool)
            to_new[rng.permutation(len(members))[: len(members) // 2]] = True
        labels[members[to_new]] = e
        centroids[e] = x[members[to_new]].mean(axis=0)
        centroids[donor] = x[members[~to_new]].mean(axis=0)
        sizes[e] = int(to_new.sum())
        sizes[donor] -= sizes[e]
    return labels, centroids, len(empty)


def squared_distance_sum(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """The k-means objective summed over points, in chunks so no second N x d array is made."""
    total = 0.0
    for s in range(0, len(x), ASSIGN_CHUNK_ROWS):
        diff = x[s : s + ASSIGN_CHUNK_ROWS] - centroids[labels[s : s + ASSIGN_CHUNK_ROWS]]
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return total


def mean_squared_distance(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """The k-means objective per point."""
    return squared_distance_sum(x, centroids, labels) / max(1, len(x))


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # (N,) int64, every cluster non-empty when N >= k
    centroids: np.ndarray  # (k, d) in the PCA-whitened space
    loss: float  # mean squared distance of the points to their centroid
    n_empty_before_split: int


def cluster_features(
    feats: np.ndarray,
    k: int,
    pca_dim: int = 256,
    whiten: bool = True,
    l2: bool = True,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    split_eps: float = 1e-4,
    use_gpu: bool = True,
    index: np.ndarray | None = None,
) -> Clustering:
    """The whole clustering step of a DeepCluster epoch, on rank 0's gathered features.

    Row i is sample `index[i]` (default: i); the initial centroids are the rows that
    `initial_indices` picks by sample index, as in `sharded_kmeans`, so that both modes start
    from the same points.
    """
    if k > len(feats):
        raise ValueError(f"k={k} but only {len(feats)} samples were extracted; lower cluster.k")
    index = np.arange(len(feats), dtype=np.int64) if index is None else index
    x = pca_whiten(feats, pca_dim, whiten=whiten, l2=l2, seed=seed)
    _, rows = rows_of(index, initial_indices(index, k, seed))
    centroids, _ = kmeans(x, k, niter, seed, max_points_per_centroid, use_gpu, x[rows])
    labels, sq_dist = assign(x, centroids, use_gpu)
    labels, centroids, n_empty = split_empty_clusters(
        x, labels, centroids, np.random.default_rng(seed), split_eps
    )
    # The assignment's distances are the objective unless a split moved centroids.
    if n_empty:
        loss = mean_squared_distance(x, centroids, labels)
    else:
        loss = float(sq_dist.mean(dtype=np.float64))
    if n_empty:
        log.info("split %d empty clusters", n_empty)
    return Clustering(labels, centroids, loss, n_empty)
