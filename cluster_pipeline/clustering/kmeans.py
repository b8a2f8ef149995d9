"""Clustering as pure functions on NumPy arrays: PCA-whitening, k-means with faiss's search,
assignment of every point and DeepCluster's empty-cluster split. Nothing here knows about torch
or torch.distributed.

One algorithm, `cluster`, serves both modes. Gather mode runs it on rank 0 over every row
(`LOCAL`); sharded mode runs it on every rank over the rows that rank extracted, and combines
what the ranks hold through the four reductions of `Holders` (sharded_kmeans.Ranks).

Every value it returns is a function of the feature values and the seed alone: not of which
rank holds a row or where the row sits in its array, not of the number of ranks, BLAS threads
or OpenMP threads, and not of memory alignment. BLAS promises none of this (OpenBLAS's Haswell
sgemm rounds a row differently at another offset in the matrix or with another thread count),
so the arithmetic is chosen to make it true on any CPU:

- matrix products (PCA's projection and covariance) are exact products of operands rounded to
  integers in float64 (`exact_matmul`), which any kernel sums to the same bits;
- per-cluster sums and the loss are sums of fixed-point integers, exact in any order;
- a point's nearest centroid is faiss's float32 answer where a bound on faiss's rounding error
  proves it is the exact argmin, and the exact argmin otherwise (`assign`);
- LAPACK's eigendecomposition, whose bits depend on its thread count, runs on one thread.

On GPUs (faiss-gpu) the search is faiss's own and its rounding is not promised bitwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

# PCA is fitted on about this many rows: the covariance is well estimated long before 1M rows.
PCA_FIT_MAX_ROWS = 200_000
# Rows per float64 block of the exact products, the search and the sums: about 64 MiB each.
BLOCK_BYTES = 64 << 20
# Rows per search on GPU: large blocks keep the device busy between host copies.
GPU_SEARCH_ROWS = 262_144
# Rows per block of the covariance: each block's Gram matrix is exact (see `covariance`).
GRAM_ROWS = 4096
# float64 represents every integer of magnitude up to 2**53 exactly.
FLOAT64_INT_BITS = 53
# float32's unit roundoff.
FLOAT32_U = 2.0**-24


def block_rows(width: int) -> int:
    """Rows of a float64 block of `width` columns that fit BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (8 * max(1, width)))


# --------------------------------------------------------------------- exact matrix products


def power_of_two_scale(max_abs: np.ndarray | float, bits: int) -> np.ndarray:
    """2**(bits - e) for max_abs < 2**e: values up to max_abs, times it, stay below 2**bits."""
    _, e = np.frexp(np.asarray(max_abs, dtype=np.float64))
    return np.ldexp(1.0, bits - e)


def exact_bits(inner: int) -> tuple[int, int]:
    """(A, B): integer bits of `exact_matmul`'s two operands for `inner` summed products, with
    A + B + ceil(log2(inner)) = 53, so that no partial sum exceeds 2**53."""
    budget = FLOAT64_INT_BITS - max(1, int(np.ceil(np.log2(max(inner, 2)))))
    return budget // 2, budget - budget // 2


def exact_matmul(a: np.ndarray, b: np.ndarray | FixedColumns) -> np.ndarray:
    """a @ b in float64, with each row of `a` and each column of `b` rounded to fixed point.

    Each row of `a` is scaled by a power of two to integers of A bits and each column of `b` to
    integers of B bits, with A + B + log2(inner dimension) <= 53: every product and partial sum
    is then an integer float64 holds exactly, and any BLAS, kernel, thread count or summation
    order gives the same bits. Row i of the result depends on row i of `a` and on `b` only.
    The rounding moves an entry by at most 2**-A of its row's largest magnitude (2**-B of its
    column's): A + B is 41 for 4096 inner terms, about float32's accumulated error there.
    `b` may come rounded already (`FixedColumns`), for many blocks of rows against one matrix.
    """
    cols = b if isinstance(b, FixedColumns) else FixedColumns.of(b)
    # Rounded in float32 when `a` is float32: a power-of-two scaling is exact there too, and the
    # integers come out the same; the float64 copy is made once, of the integers.
    aq: np.ndarray = np.array(a, dtype=np.float32 if a.dtype == np.float32 else np.float64)
    top = np.maximum(aq.max(axis=1, initial=0.0), -aq.min(axis=1, initial=0.0))
    # (capped for float32's range: a row below 2**-100 of its scale rounds to zeros anyway)
    a_scale = np.minimum(power_of_two_scale(top, cols.row_bits), 2.0**100).astype(aq.dtype)
    a_scale = a_scale[:, None]
    aq *= a_scale
    np.rint(aq, out=aq)
    out = aq.astype(np.float64) @ cols.values
    out /= a_scale  # powers of two: exact
    out /= cols.scale
    return out


@dataclass(frozen=True)
class FixedColumns:
    """The right operand of `exact_matmul`, its columns rounded to B-bit integers."""

    values: np.ndarray  # (m, p) float64 integers
    scale: np.ndarray  # (p,) powers of two: values = rint(b * scale)
    row_bits: int  # A, the bits left for the rows of the left operand

    @classmethod
    def of(cls, b: np.ndarray) -> FixedColumns:
        a_bits, b_bits = exact_bits(b.shape[0])
        b64 = np.asarray(b, dtype=np.float64)
        scale = power_of_two_scale(np.abs(b64).max(axis=0, initial=0.0), b_bits)
        return cls(np.rint(b64 * scale), scale, a_bits)


def covariance(x: np.ndarray, mean: np.ndarray, exact: bool = True) -> np.ndarray:
    """The (d, d) float64 covariance of the rows of `x` around `mean`.

    GRAM_ROWS rows at a time, each block's Gram matrix exact: the centred block's columns are
    rounded to integers of half the bits `exact_bits` allows both operands, so q.T @ q (one
    symmetric BLAS product) sums integers exactly. The blocks are added in row order, so the
    result depends on the rows alone. `exact=False`: one float32 BLAS product (fast; its bits
    depend on the BLAS, its threads and the rows' positions).
    """
    if not exact:
        centred = x - mean.astype(np.float32)
        return (centred.T @ centred).astype(np.float64) / max(1, len(x) - 1)
    d = x.shape[1]
    gram = np.zeros((d, d), dtype=np.float64)
    for s in range(0, len(x), GRAM_ROWS):
        q = x[s : s + GRAM_ROWS].astype(np.float64) - mean
        bits = min(exact_bits(len(q)))
        scale = power_of_two_scale(np.abs(q).max(axis=0, initial=0.0), bits)
        q *= scale
        np.rint(q, out=q)
        block = q.T @ q
        block /= scale[:, None]  # powers of two: exact
        block /= scale[None, :]
        gram += block
    return gram / max(1, len(x) - 1)


# ---------------------------------------------------------------------------- PCA / whitening


@dataclass(frozen=True)
class PCA:
    mean: np.ndarray  # (d_in,) float32
    proj: np.ndarray  # (d_in, d_out) float32; columns scaled by 1/sqrt(eigenvalue) when whitening
    # Fitted and applied with exact products (CPU clustering); False: float32 BLAS, for a
    # clustering whose search runs on GPUs and is not bitwise anyway (5x faster on the CPU).
    exact: bool = True

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) @ proj in float32, exact row by row (`exact_matmul`): a row gets the same
        bits whichever array, rank or position it is projected in."""
        out = np.empty((len(x), self.proj.shape[1]), dtype=np.float32)
        proj = FixedColumns.of(self.proj) if self.exact else self.proj
        step = block_rows(self.proj.shape[0])
        for s in range(0, len(x), step):
            centred = x[s : s + step] - self.mean
            out[s : s + step] = exact_matmul(centred, proj) if self.exact else centred @ proj
        return out


def fit_pca(
    x: np.ndarray,
    dim: int,
    whiten: bool = True,
    eps: float = 1e-5,
    seed: int = 0,
    exact: bool = True,
) -> PCA:
    """Top-`dim` principal directions of `x`, optionally scaled to unit variance (whitening).

    Above PCA_FIT_MAX_ROWS rows, a sample of rows chosen by `keep_fraction` is fitted. `exact`
    (see PCA.exact): an exact covariance, and LAPACK on one thread.
    """
    n, d = x.shape
    if not 0 < dim <= d:
        raise ValueError(f"PCA dimension {dim} must be in 1..{d} (the feature dimension)")
    if n > PCA_FIT_MAX_ROWS:
        x = x[keep_fraction(np.arange(n), PCA_FIT_MAX_ROWS / n, seed, SALT_PCA)]
    import scipy.linalg  # here, not at import: a rank that never fits a PCA starts faster

    mean = x.mean(axis=0, dtype=np.float64)
    cov = covariance(x, mean, exact)
    with threadpool_limits(1 if exact else None, user_api="blas"):  # LAPACK's bits: threads
        evals, evecs = scipy.linalg.eigh(cov, subset_by_index=[d - dim, d - 1])
    top = np.argsort(evals, kind="stable")[::-1]  # descending variance
    proj = evecs[:, top]
    if whiten:
        proj = proj / np.sqrt(np.maximum(evals[top], 0.0) + eps)
    return PCA(mean=mean.astype(np.float32), proj=proj.astype(np.float32), exact=exact)


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
    if l2:  # in place and in blocks: one N x d array at a time, not three
        for s in range(0, len(x), block_rows(x.shape[1])):
            chunk = x[s : s + block_rows(x.shape[1])]
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

    A holder's candidates are its own k smallest, and the k smallest of the union of every
    holder's candidates are the global k smallest, whatever the number of holders.
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
    of about fraction * N samples, chosen by index so that no holder's share matters."""
    if fraction >= 1.0:
        return np.ones(len(index), dtype=bool)
    return sample_keys(index, seed, salt) < _U64(int(fraction * 2.0**64))


# ------------------------------------------------------------------ nearest-centroid search


def num_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class GpuSearch:
    """faiss's nearest-centroid search on one GPU (a rank's own, in sharded mode) or on every
    GPU of the machine (`device=None`, rank 0 in gather mode: the centroids on each, the points
    split between them). The GPUs' resources are made once and reused by every search of a
    clustering (each reserves scratch memory on its device)."""

    def __init__(self, device: int | None = None) -> None:
        self.device = device
        count = 1 if device is not None else num_gpus()
        self.resources = [faiss.StandardGpuResources() for _ in range(count)]

    def index(self, d: int) -> faiss.Index:
        if self.device is not None:
            return faiss.index_cpu_to_gpu(self.resources[0], self.device, faiss.IndexFlatL2(d))
        return faiss.index_cpu_to_gpu_multiple_py(self.resources, faiss.IndexFlatL2(d))

    def nearest(self, x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        index = self.index(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        labels = np.empty(len(x), dtype=np.int64)
        for s in range(0, len(x), GPU_SEARCH_ROWS):
            _, ii = index.search(np.ascontiguousarray(x[s : s + GPU_SEARCH_ROWS]), 1)
            labels[s : s + len(ii)] = ii[:, 0]
        return labels


def assign(
    x: np.ndarray,
    centroids: np.ndarray,
    gpu: GpuSearch | None = None,
    x_norm: np.ndarray | None = None,
) -> np.ndarray:
    """Index (int64) of every point's nearest centroid in L2, ties to the lowest index.

    On CPU the labels are exactly those of `exact_nearest` for every row, whatever faiss's
    kernels or thread count: faiss's float32 search gives each point its two nearest
    centroids, and where the gap between them exceeds a bound on faiss's rounding error plus
    the exact metric's, faiss's choice is the exact one; the few other rows are searched
    exactly. With `gpu`, faiss's answer on the GPU(s), not promised bitwise. `x_norm`: the rows'
    L2 norms (`row_norms`), when the same rows are assigned again and again (Lloyd).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if gpu is not None:
        return gpu.nearest(x, centroids)
    k, d = centroids.shape
    labels = np.zeros(len(x), dtype=np.int64)
    if k == 1 or not len(x):
        return labels
    index = faiss.IndexFlatL2(d)
    index.add(centroids)
    c_norm = float(row_norms(centroids).max())
    step = block_rows(d)
    for s in range(0, len(x), step):
        part = x[s : s + step]
        dist, ids = index.search(part, 2)
        norms = row_norms(part) if x_norm is None else x_norm[s : s + step]
        unsure = np.flatnonzero(~(dist[:, 1] - dist[:, 0] > search_margin(norms, c_norm, d)))
        labels[s : s + len(part)] = ids[:, 0]
        if len(unsure):
            labels[s + unsure] = exact_nearest(part[unsure], centroids)
    return labels


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row, float64."""
    out = np.empty(len(x), dtype=np.float64)
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        out[s : s + step] = np.sqrt(np.square(x[s : s + step], dtype=np.float64).sum(axis=1))
    return out


def search_margin(x_norm: np.ndarray, c_norm: float, d: int) -> np.ndarray:
    """How much faiss's top-2 gap must exceed for its nearest centroid to be the exact one.

    The exact argmin is within 2 (eps + delta) of faiss's best value, eps bounding faiss's
    error (`faiss_distance_error`) and delta `exact_nearest`'s (`exact_metric_error`); a
    larger gap to faiss's second best proves faiss's best is it. Twice that is the margin.
    """
    return 4.0 * (faiss_distance_error(x_norm, c_norm, d) + exact_metric_error(x_norm, c_norm, d))


def faiss_distance_error(x_norm: np.ndarray, c_norm: float, d: int) -> np.ndarray:
    """A bound on the error of faiss's float32 squared distance from x to any centroid of
    norm <= c_norm. faiss computes |x|^2 + |c|^2 - 2 x.c (or a sum of squared differences):
    whatever the kernel and summation order, a length-d float32 sum is off by at most
    gamma_d = d u / (1 - d u) of the sum of its absolute terms, and each of the two additions
    by u, so the error is below (d + 3) u (|x| + |c|)^2 up to second order in u."""
    return 1.25 * (d + 4) * FLOAT32_U * (x_norm + c_norm) ** 2


def exact_metric_error(x_norm: np.ndarray, c_norm: float, d: int) -> np.ndarray:
    """A bound on how far `exact_nearest`'s |c|^2 - 2 x.c, plus |x|^2, is from the squared
    distance: x and c are rounded to A and B bits (`exact_matmul`), which moves each by at
    most sqrt(d) 2^-A |x| (2^-B |c|)."""
    a_bits, b_bits = exact_bits(d)
    return 2.1 * np.sqrt(d) * (2.0**-a_bits + 2.0**-b_bits) * x_norm * c_norm


def exact_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """argmin over centroids of |c|^2 - 2 x.c with x.c from `exact_matmul`: every value is a
    deterministic function of (x, c), so the first minimum is the same on any machine."""
    c_sq = np.square(centroids, dtype=np.float64).sum(axis=1)
    cols = FixedColumns.of(centroids.T)
    labels = np.empty(len(x), dtype=np.int64)
    step = block_rows(len(centroids))
    for s in range(0, len(x), step):
        scores = exact_matmul(x[s : s + step], cols)
        scores *= -2.0
        scores += c_sq
        labels[s : s + len(scores)] = scores.argmin(axis=1)
    return labels


def squared_distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each point's squared L2 distance to its own centroid, float64, one row at a time (a
    row's sum runs over its d values in a fixed order, so its bits depend on that row only)."""
    out = np.empty(len(x), dtype=np.float64)
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        diff = x[s : s + step].astype(np.float64) - centroids[labels[s : s + step]]
        out[s : s + len(diff)] = np.square(diff, out=diff).sum(axis=1)
    return out


def squared_distance_sum(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """The k-means objective summed over points."""
    return float(squared_distances(x, centroids, labels).sum())


def kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    use_gpu: bool = True,
    init_centroids: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Bare `faiss.Kmeans` for small problems outside the pipeline's clustering step (the
    specialists' C x C matrix): (k, d) centroids and faiss's final objective. Its float32 sums
    and BLAS search are not promised bitwise; `cluster` is."""
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
    return np.ascontiguousarray(km.centroids, dtype=np.float32), float(objective[-1])


# ------------------------------------------------------------ Lloyd steps in exact fixed point


def fixed_point_scale(max_abs: float, num_points: int) -> float:
    """The power of two by which values up to `max_abs` are scaled to integers so that a sum
    of `num_points` of them stays below 2**52: exact in float64 (bincount) and in int64.

    Integer sums do not depend on their order, so per-cluster sums over any number of ranks
    are bit-identical. At N = 1.28M and |x| <= 1 (L2) the resolution is 2**-31; at N = 1e9,
    2**-22, still far below what moves a centroid of 1e9 / k points.
    """
    bits = 52 - int(np.ceil(np.log2(max(num_points, 1) + 1)))
    bits -= int(np.ceil(np.log2(max_abs))) if max_abs > 0 else 0
    return float(2.0 ** min(bits, 60))


def to_fixed_point(x: np.ndarray, scale: float) -> np.ndarray:
    """Rows times `scale`, rounded: integers in float64, column-major for `cluster_sums`."""
    q = np.empty(x.shape, dtype=np.float64, order="F")
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        part = np.multiply(x[s : s + step], scale, dtype=np.float64)
        q[s : s + step] = np.rint(part, out=part)
    return q


def cluster_sums(q: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (int64) of fixed-point rows `q` (`to_fixed_point`) and the counts.

    One bincount per column: exact, since every partial sum is an integer below 2**53.
    """
    q = np.asfortranarray(q)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    sums = np.empty((k, q.shape[1]), dtype=np.int64)
    for j, column in enumerate(q.T):
        sums[:, j] = np.bincount(labels, weights=column, minlength=k)
    return sums, counts


def fixed_point_sums(
    x: np.ndarray, labels: np.ndarray, k: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """`cluster_sums` of `to_fixed_point(x, scale)`, a block of rows at a time (no N x d
    float64 copy)."""
    sums = np.zeros((k, x.shape[1]), dtype=np.int64)
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        sums += cluster_sums(to_fixed_point(x[s : s + step], scale), labels[s : s + step], k)[0]
    return sums, np.bincount(labels, minlength=k).astype(np.int64)


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
    """DeepCluster's fix for empty clusters, applied until none is empty (needs N >= k), on
    points that are all here and carry no sample index (the specialists' columns).

    For each empty cluster: pick a non-empty cluster with probability proportional to its size
    (among those with at least two points, which exist while any cluster is empty and N >= k),
    give the empty cluster a copy of its centroid perturbed by +eps and the donor -eps, and split
    the donor's points between the two by nearest centroid. When the perturbation does not
    separate them (duplicate points), the points are split in two random halves. Both centroids
    are then moved to the mean of their points. Returns (labels, centroids, empty count before).
    The clustering step uses `split_empty_clusters_keyed`, which decides alike on every rank.
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


# -------------------------------------------------------------- the clustering step, once


class Holders(Protocol):
    """Where the rows being clustered are, and how what each holder computed is combined.

    `LOCAL`: this process holds every row. sharded_kmeans.Ranks: every rank holds some, and
    each method is a collective (call it on every rank).
    """

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over holders of an int64 (exact) or float64 array."""
        ...

    def max(self, value: float) -> float:
        """The largest holder's value."""
        ...

    def concat(self, values: np.ndarray) -> np.ndarray:
        """Every holder's 1-D int64 values, concatenated."""
        ...

    def fit_pca(
        self, index: np.ndarray, rows: np.ndarray, dim: int, whiten: bool, seed: int, exact: bool
    ) -> PCA:
        """`fit_pca` of every holder's `rows` together, in order of `index`, fitted once; the
        PCA on every holder."""
        ...


class _Local:
    def sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def max(self, value: float) -> float:
        return float(value)

    def concat(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)

    def fit_pca(
        self, index: np.ndarray, rows: np.ndarray, dim: int, whiten: bool, seed: int, exact: bool
    ) -> PCA:
        rows = rows[np.argsort(index, kind="stable")]
        return fit_pca(rows, dim, whiten=whiten, seed=seed, exact=exact)


LOCAL: Holders = _Local()

# Rounds of the empty-cluster split before giving up: a round fails for a donor only when its
# points are duplicates and every coin fell on one side (probability <= 1/2 per round).
MAX_SPLIT_ROUNDS = 64


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # (n,) int64 of the rows clustered, every cluster non-empty when N >= k
    centroids: np.ndarray  # (k, d) in the PCA-whitened space
    loss: float  # mean squared distance of the points to their centroid
    n_empty_before_split: int
    pca: PCA | None = None  # the projection the centroids live behind (None: no PCA)


def cluster(
    holders: Holders,
    index: np.ndarray,
    feats: np.ndarray,
    k: int,
    pca_dim: int = 256,
    whiten: bool = True,
    l2: bool = True,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    split_eps: float = 1e-4,
    gpu: GpuSearch | None = None,
) -> Clustering:
    """The clustering step of a DeepCluster epoch: PCA fitted on a sample, projection and L2,
    Lloyd's iterations from k samples chosen by key, assignment of every row, the empty-cluster
    split. Row j of `feats` is sample `index[j]`; the labels are those of this holder's rows,
    the rest is the same on every holder. Collective when `holders` is: call on every rank.
    """
    n = int(holders.sum(np.array([len(index)], dtype=np.int64))[0])
    if k > n:
        raise ValueError(f"k={k} but only {n} samples were extracted; lower cluster.k")
    exact = gpu is None  # on GPUs the search is not bitwise: plain float32 products there too
    pca = None
    if pca_dim:
        pca = fit_pca_on_sample(holders, index, feats, n, pca_dim, whiten, seed, exact)
    x = project(feats, pca, l2)
    check_finite(holders, x, index)
    centroids = initial_centroids(holders, x, index, k, seed)
    max_abs = holders.max(max(x.max(initial=0.0), -x.min(initial=0.0)))
    scale = fixed_point_scale(max_abs, n)
    train = keep_fraction(index, k * max_points_per_centroid / n, seed, SALT_TRAIN)
    x_train = x if train.all() else x[train]  # a copy only when subsampling (k * mppc < N)
    rng = np.random.default_rng([seed, SALT_TRAIN])
    centroids = lloyd(holders, x_train, centroids, niter, scale, rng, gpu)
    labels = assign(x, centroids, gpu)
    labels, centroids, n_empty = split_empty_clusters_keyed(
        holders, x, index, labels, centroids, scale, seed, split_eps
    )
    if n_empty:
        log.info("split %d empty clusters", n_empty)
    loss = mean_loss(holders, x, centroids, labels, max_abs, n)
    return Clustering(labels, centroids, loss, n_empty, pca)


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
    """`cluster` over rows that are all here: rank 0's gathered features, an analysis's.

    Row i is sample `index[i]` (default: i). `use_gpu`: search on every GPU of the machine.
    """
    if k > len(feats):
        raise ValueError(f"k={k} but only {len(feats)} samples were extracted; lower cluster.k")
    index = np.arange(len(feats), dtype=np.int64) if index is None else index
    gpu = GpuSearch() if use_gpu and num_gpus() > 0 else None
    return cluster(
        LOCAL, index, feats, k, pca_dim, whiten, l2, niter, seed, max_points_per_centroid,
        split_eps, gpu,
    )  # fmt: skip


def fit_pca_on_sample(
    holders: Holders,
    index: np.ndarray,
    feats: np.ndarray,
    num_rows: int,
    dim: int,
    whiten: bool,
    seed: int,
    exact: bool = True,
) -> PCA:
    """PCA fitted once from about PCA_FIT_MAX_ROWS of the `num_rows` rows, each kept by its
    sample's key whichever holder has it. Below that many rows every row is kept."""
    keep = keep_fraction(index, PCA_FIT_MAX_ROWS / num_rows, seed, SALT_PCA)
    return holders.fit_pca(index[keep], feats[keep], dim, whiten, seed, exact)


def check_finite(holders: Holders, x: np.ndarray, index: np.ndarray) -> None:
    """Stop, on every holder alike, before k-means runs on NaN or infinite features."""
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    total = int(holders.sum(np.array([len(bad)], dtype=np.int64))[0])
    if total:
        here = f"; here: samples {index[bad[:5]].tolist()}" if len(bad) else ""
        raise ValueError(
            f"{total} samples have NaN or infinite features{here}: the network's outputs are "
            "not finite (diverged training? lower optim.lr) or a feature file is damaged"
        )


def initial_centroids(
    holders: Holders, x: np.ndarray, index: np.ndarray, k: int, seed: int
) -> np.ndarray:
    """The rows of the k samples `initial_indices` picks over all holders, on every holder:
    each offers its own k candidates, then fills the chosen rows it holds into a zero k x d
    matrix that is summed over holders."""
    chosen = initial_indices(holders.concat(initial_indices(index, k, seed)), k, seed)
    init = np.zeros((k, x.shape[1]), dtype=np.float64)
    at, rows = rows_of(index, chosen)
    init[at] = x[rows]
    return holders.sum(init).astype(np.float32)


def lloyd(
    holders: Holders,
    x: np.ndarray,
    centroids: np.ndarray,
    niter: int,
    scale: float,
    rng: np.random.Generator,
    gpu: GpuSearch | None = None,
) -> np.ndarray:
    """`niter` Lloyd iterations: assign, sum per cluster, move the centroids.

    The fixed-point sums of the first iteration are updated by the rows that changed cluster
    afterwards (integers: the same bits as summing again). One sum over holders of k x (d + 1)
    int64 per iteration. A cluster that empties before the last iteration is split the way
    faiss does it, on the counts alone; after the last one the centroids are left as the
    means, and `split_empty_clusters_keyed` fills what is empty then.
    """
    k = len(centroids)
    labels: np.ndarray | None = None
    sums = counts = np.zeros(0, dtype=np.int64)
    x_norm = row_norms(x) if gpu is None else None
    for it in range(niter):
        new = assign(x, centroids, gpu, x_norm)
        if labels is None:
            sums, counts = fixed_point_sums(x, new, k, scale)
        else:
            moved = np.flatnonzero(new != labels)
            if len(moved):
                q = to_fixed_point(x[moved], scale)
                into, n_into = cluster_sums(q, new[moved], k)
                out_of, n_out = cluster_sums(q, labels[moved], k)
                sums += into - out_of
                counts += n_into - n_out
        labels = new
        total = holders.sum(np.concatenate([sums, counts[:, None]], axis=1))
        centroids = centroids_from_sums(total[:, :-1], total[:, -1], scale, centroids)
        if it < niter - 1:
            centroids, _, _ = split_empty_centroids(centroids, total[:, -1], rng)
    return centroids


def split_empty_clusters_keyed(
    holders: Holders,
    x: np.ndarray,
    index: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    scale: float,
    seed: int,
    eps: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, int]:
    """DeepCluster's split (`split_empty_clusters`) with every holder moving its own points
    and deciding alike.

    The donor and the perturbation come from the global sizes and a generator seeded alike on
    every holder. The donor's points go to the nearer of the two perturbed centroids; when that
    leaves one side empty (duplicates), they go by a coin keyed by sample index instead of in
    random halves, and when the coins fall on one side too, the empty cluster waits for the next
    round (fresh coins). One sum over holders of 4 x (d + 1) int64 per split. Returns (labels,
    centroids, number empty before).
    """
    k, d = centroids.shape
    labels, centroids = labels.copy(), centroids.copy()
    sizes = holders.sum(np.bincount(labels, minlength=k).astype(np.int64))
    if sizes.sum() < k:
        raise ValueError(f"cannot fill {k} clusters from {sizes.sum()} points")
    rng = np.random.default_rng(seed)
    n_empty = int((sizes == 0).sum())
    for attempt in range(MAX_SPLIT_ROUNDS):
        empty = np.flatnonzero(sizes == 0)
        if not len(empty):
            return labels, centroids, n_empty
        for e in empty.tolist():
            donor = choose_donor(sizes, rng)
            members = np.flatnonzero(labels == donor)
            pair = perturbed_pair(centroids[donor], eps, rng)
            sides = (
                closer_to_first(x[members], pair),
                coin(index[members], seed, salt=attempt * k + e),
            )
            q = to_fixed_point(x[members], scale)
            parts = [cluster_sums(q, (~s).astype(np.int64), 2) for s in sides]
            packed = np.concatenate([np.concatenate([s, c[:, None]], axis=1) for s, c in parts])
            total = holders.sum(packed).reshape(2, 2, d + 1)
            for side, sums in zip(sides, total, strict=True):
                if sums[0, -1] and sums[1, -1]:  # both halves non-empty
                    labels[members[side]] = e
                    both = np.array([e, donor])
                    centroids[both] = centroids_from_sums(
                        sums[:, :-1], sums[:, -1], scale, centroids[both]
                    )
                    sizes[e], sizes[donor] = sums[:, -1]
                    break
    raise RuntimeError(
        f"{int((sizes == 0).sum())} clusters still empty after {MAX_SPLIT_ROUNDS} rounds of "
        f"splitting (k={k}, {sizes.sum()} points): every coin fell on one side, which should "
        "not happen"
    )


def mean_loss(
    holders: Holders,
    x: np.ndarray,
    centroids: np.ndarray,
    labels: np.ndarray,
    max_abs: float,
    n: int,
) -> float:
    """The k-means objective per point, from fixed-point squared distances summed exactly:
    the same bits on any number of holders."""
    bound = x.shape[1] * (2.0 * max_abs) ** 2 * 1.01  # centroids are means of the points
    scale = fixed_point_scale(bound, n)
    total = 0
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        q = np.rint(squared_distances(x[s : s + step], centroids, labels[s : s + step]) * scale)
        total += int(q.sum())  # integers below 2**52: exact in any order
    summed = holders.sum(np.array([total], dtype=np.int64))
    return float(summed[0]) / scale / max(1, n)


def mean_squared_distance(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """The k-means objective per point, rows all here (floating-point sum)."""
    return squared_distance_sum(x, centroids, labels) / max(1, len(x))
