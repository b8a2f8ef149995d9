"""Clustering as pure functions on NumPy arrays: PCA-whitening, faiss k-means, full assignment, and
DeepCluster's empty-cluster split. Nothing here knows about torch or torch.distributed.
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
    xc = (x - mean).astype(np.float32)
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


def pca_whiten(
    x: np.ndarray, dim: int, whiten: bool = True, l2: bool = True, seed: int = 0
) -> np.ndarray:
    """DeepCluster's preprocessing: PCA to `dim` (0 keeps all), whitening, L2 normalization."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dim > 0:
        x = fit_pca(x, dim, whiten=whiten, seed=seed).apply(x)
    if l2:
        x = l2_normalize(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def num_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    use_gpu: bool = True,
) -> tuple[np.ndarray, float]:
    """faiss k-means; returns (k, d) centroids and the final training objective.

    On a machine with GPUs faiss shards the work over all of them; faiss trains on at most
    k * max_points_per_centroid points, so use `assign` for the labels of all points.
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
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    objective = np.asarray(km.obj if km.obj is not None else [np.nan])
    obj = float(objective[-1])
    return np.ascontiguousarray(km.centroids, dtype=np.float32), obj


def assign(
    x: np.ndarray, centroids: np.ndarray, use_gpu: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of every point: (labels int64, squared distances float32)."""
    index: faiss.Index = faiss.IndexFlatL2(centroids.shape[1])
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
        splittable = np.where(sizes >= 2, sizes, 0).astype(np.float64)
        donor = int(rng.choice(k, p=splittable / splittable.sum()))
        members = np.flatnonzero(labels == donor)
        noise = eps * rng.standard_normal(centroids.shape[1], dtype=np.float32)
        scale = np.abs(centroids[donor]).mean() + eps
        pair = np.stack([centroids[donor] + noise * scale, centroids[donor] - noise * scale])
        d2 = ((x[members, None, :] - pair[None, :, :]) ** 2).sum(-1)
        to_new = d2[:, 0] < d2[:, 1]
        if to_new.all() or not to_new.any():
            to_new = np.zeros(len(members), dtype=bool)
            to_new[rng.permutation(len(members))[: len(members) // 2]] = True
        labels[members[to_new]] = e
        centroids[e] = x[members[to_new]].mean(axis=0)
        centroids[donor] = x[members[~to_new]].mean(axis=0)
        sizes[e] = int(to_new.sum())
        sizes[donor] -= sizes[e]
    return labels, centroids, len(empty)


def mean_squared_distance(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """The k-means objective per point, in chunks so no second N x d array is made."""
    total = 0.0
    for s in range(0, len(x), ASSIGN_CHUNK_ROWS):
        diff = x[s : s + ASSIGN_CHUNK_ROWS] - centroids[labels[s : s + ASSIGN_CHUNK_ROWS]]
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return total / max(1, len(x))


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
) -> Clustering:
    """The whole clustering step of a DeepCluster epoch, on rank 0's gathered features."""
    if k > len(feats):
        raise ValueError(f"k={k} but only {len(feats)} samples were extracted; lower cluster.k")
    x = pca_whiten(feats, pca_dim, whiten=whiten, l2=l2, seed=seed)
    centroids, _ = kmeans(x, k, niter, seed, max_points_per_centroid, use_gpu)
    labels, _ = assign(x, centroids, use_gpu)
    labels, centroids, n_empty = split_empty_clusters(
        x, labels, centroids, np.random.default_rng(seed), split_eps
    )
    loss = mean_squared_distance(x, centroids, labels)
    if n_empty:
        log.info("split %d empty clusters", n_empty)
    return Clustering(labels, centroids, loss, n_empty)
