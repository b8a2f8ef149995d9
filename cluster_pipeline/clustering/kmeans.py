"""The clustering step of a DeepCluster epoch, as pure functions on NumPy arrays: PCA-whitening
(`pca`), Lloyd's iterations on a certified nearest-centroid search (`search`), assignment of
every point and the empty-cluster split (`split`). Nothing here knows about torch.distributed;
the torch backend (`torch_kmeans`, cluster.backend=torch) sits behind the same `Engine`.

One algorithm, `cluster`, serves both modes. Gather mode runs it on rank 0 over every row
(`holders.LOCAL`); sharded mode runs it on every rank over the rows that rank extracted, and
combines what the ranks hold through the four reductions of `Holders` (sharded.Ranks). It
reads its parameters from the `cluster` section of the config (`ClusterConfig`).

Every value it returns is a function of the feature values and the seed alone: not of which
rank holds a row or where the row sits in its array, not of the number of ranks, BLAS threads
or OpenMP threads, and not of memory alignment. BLAS promises none of this (OpenBLAS's Haswell
sgemm rounds a row differently at another offset in the matrix or with another thread count),
so the arithmetic is chosen to make it true on any CPU:

- matrix products (PCA's projection and covariance) are exact products of operands rounded to
  integers in float64 (`exact.exact_matmul`), which any kernel sums to the same bits;
- per-cluster sums and the loss are sums of fixed-point integers, exact in any order;
- a point's nearest centroid is the float32 search's answer where a bound on float32's
  rounding error proves it is the exact argmin, and the exact argmin otherwise
  (`search.assign`);
- every random choice is keyed by global sample index (`keys`);
- LAPACK's eigendecomposition, whose bits depend on its thread count, runs on one thread.

On GPUs (faiss-gpu) the search is faiss's own and its rounding is not promised bitwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cluster_pipeline.clustering.exact import (
    block_rows,
    centroids_from_sums,
    cluster_sums,
    fixed_point_scale,
    fixed_point_sums,
    squared_distances,
    to_fixed_point,
    unit_rows,
)
from cluster_pipeline.clustering.holders import LOCAL, Holders
from cluster_pipeline.clustering.keys import SALT_TRAIN, initial_indices, keep_fraction, rows_of
from cluster_pipeline.clustering.pca import PCA, fit_pca_on_sample, project
from cluster_pipeline.clustering.search import GpuSearch, assign, num_gpus, row_norms
from cluster_pipeline.clustering.split import split_empty_centroids, split_empty_clusters_keyed

if TYPE_CHECKING:  # the type only: importing the config at run time would import torch
    from cluster_pipeline.config import ClusterConfig

log = logging.getLogger(__name__)


class Engine(Protocol):
    """Where Lloyd's iterations and the assignments run: cluster.backend's one seam.

    `FaissEngine` (faiss): NumPy's certified float32 search on the CPU, faiss's on GPUs.
    `torch_kmeans.TorchEngine` (torch): torch on the rank's GPU, or on the CPU.
    """

    @property
    def exact_pca(self) -> bool:
        """Fit and apply the PCA with exact products (bitwise runs)."""
        ...

    @property
    def pca_device(self) -> str | None:
        """The torch device the PCA runs on (`pca_torch`); None: NumPy on the host."""
        ...

    def assign(self, x: np.ndarray, centroids: np.ndarray) -> np.ndarray: ...

    def lloyd(
        self,
        holders: Holders,
        x: np.ndarray,
        centroids: np.ndarray,
        niter: int,
        scale: float,
        rng: np.random.Generator,
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class FaissEngine:
    """cluster.backend=faiss: the certified float32 search on the CPU (`search.assign`), or
    faiss's search on `gpu`; the sums and centroids in NumPy (`lloyd`)."""

    gpu: GpuSearch | None = None
    # The torch device of the PCA when the search runs on GPUs (this holder's first one).
    gpu_device: str | None = None
    # cluster.spherical: unit-length centroids after every update.
    spherical: bool = False

    @property
    def exact_pca(self) -> bool:
        return self.gpu is None  # on GPUs the search is not bitwise: nor need the PCA be

    @property
    def pca_device(self) -> str | None:
        return None if self.gpu is None else self.gpu_device

    def assign(self, x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        return assign(x, centroids, self.gpu)

    def lloyd(
        self,
        holders: Holders,
        x: np.ndarray,
        centroids: np.ndarray,
        niter: int,
        scale: float,
        rng: np.random.Generator,
    ) -> np.ndarray:
        return lloyd(holders, x, centroids, niter, scale, rng, self.gpu, self.spherical)


def make_engine(c: ClusterConfig, gpu_index: int | None, all_gpus: bool) -> Engine:
    """The engine of cluster.backend for a holder whose GPU is `gpu_index` (None: no GPU, or
    cluster.use_gpu=false). `all_gpus`: the faiss backend searches on every GPU of the machine
    (rank 0 in gather mode); the torch backend always uses the one GPU."""
    if c.backend == "torch":
        from cluster_pipeline.clustering.torch_kmeans import TorchEngine

        device = "cpu" if gpu_index is None or not c.use_gpu else f"cuda:{gpu_index}"
        return TorchEngine(device, str(c.torch_matmul), c.spherical)
    if gpu_index is not None and c.use_gpu and num_gpus() == 0:
        log.warning("cluster.backend=faiss: this GPU node has no faiss-gpu, so k-means runs on "
                    "the CPU; install '.[gpu]' or set cluster.backend=torch")  # fmt: skip
    if gpu_index is None or not c.use_gpu or num_gpus() == 0:
        return FaissEngine(spherical=c.spherical)
    gpu = GpuSearch() if all_gpus else GpuSearch(gpu_index)
    return FaissEngine(gpu, f"cuda:{gpu_index}", c.spherical)


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # (n,) int32 of the rows clustered, every cluster non-empty when N >= k
    centroids: np.ndarray  # (k, d) in the PCA-whitened space
    loss: float  # mean squared distance of the points to their centroid
    n_empty_before_split: int
    pca: PCA | None = None  # the projection the centroids live behind (None: no PCA)


def cluster(
    holders: Holders,
    index: np.ndarray,
    feats: np.ndarray,
    c: ClusterConfig,
    seed: int,
    engine: Engine | None = None,
) -> Clustering:
    """The clustering step of a DeepCluster epoch: PCA fitted on a sample, projection and L2,
    Lloyd's iterations from k samples chosen by key, assignment of every row, the empty-cluster
    split. Row j of `feats` is sample `index[j]`; the labels are those of this holder's rows,
    the rest is the same on every holder. Lloyd's iterations and the assignments run on
    `engine` (default: the CPU's certified search): the caller makes it (`make_engine`), since
    it knows which GPUs are this holder's.

    Collective when `holders` is: call on every rank.
    """
    k = c.k
    engine = engine or FaissEngine()
    n = int(holders.sum(np.array([len(index)], dtype=np.int64))[0])
    if k > n:
        raise ValueError(f"k={k} but only {n} samples were extracted; lower cluster.k")
    pca = None
    if c.pca_dim:
        pca = fit_pca_on_sample(holders, index, feats, n, c.pca_dim, c.whiten, seed,
                                engine.exact_pca, engine.pca_device)  # fmt: skip
    x = project(feats, pca, c.l2_normalize)
    check_finite(holders, x, index)
    centroids = initial_centroids(holders, x, index, k, seed)
    max_abs = holders.max(max(x.max(initial=0.0), -x.min(initial=0.0)))
    scale = fixed_point_scale(max_abs, n)
    train = keep_fraction(index, k * c.max_points_per_centroid / n, seed, SALT_TRAIN)
    x_train = x if train.all() else x[train]  # a copy only when subsampling (k * mppc < N)
    rng = np.random.default_rng([seed, SALT_TRAIN])
    centroids = engine.lloyd(holders, x_train, centroids, c.niter, scale, rng)
    labels = engine.assign(x, centroids)
    labels, centroids, n_empty = split_empty_clusters_keyed(
        holders, x, index, labels, centroids, scale, seed, c.split_eps
    )
    if n_empty:
        log.info("split %d empty clusters", n_empty)
    if c.spherical:  # the split's new centroids are means: back to unit length
        centroids = unit_rows(centroids).astype(np.float32)
    loss = mean_loss(holders, x, centroids, labels, max_abs, n)
    return Clustering(labels, centroids, loss, n_empty, pca)


def cluster_features(
    feats: np.ndarray, c: ClusterConfig, seed: int, index: np.ndarray | None = None
) -> Clustering:
    """`cluster` over rows that are all here: rank 0's gathered features, an analysis's.

    Row i is sample `index[i]` (default: i). `c.use_gpu`: faiss searches on every GPU of the
    machine, torch runs on this process's current GPU.
    """
    index = np.arange(len(feats), dtype=np.int64) if index is None else index
    return cluster(LOCAL, index, feats, c, seed, make_engine(c, current_gpu(), all_gpus=True))


def current_gpu() -> int | None:
    """This process's CUDA device (the rank's own), or None without one."""
    import torch  # here: the clustering functions themselves need NumPy alone

    return int(torch.cuda.current_device()) if torch.cuda.is_available() else None


def check_finite(holders: Holders, x: np.ndarray, index: np.ndarray) -> None:
    """Stop, on every holder alike, before k-means runs on NaN or infinite features.

    Collective when `holders` is: call on every rank.
    """
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
    matrix that is summed over holders.

    Collective when `holders` is: call on every rank.
    """
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
    spherical: bool = False,
) -> np.ndarray:
    """`niter` Lloyd iterations: assign, sum per cluster, move the centroids (`spherical`:
    to the unit-length direction of the cluster's mean).

    The fixed-point sums of the first iteration are updated by the rows that changed cluster
    afterwards (integers: the same bits as summing again). One sum over holders of k x (d + 1)
    int64 per iteration. A cluster that empties before the last iteration is split the way
    faiss does it, on the counts alone; after the last one the centroids are left as the
    means, and `split_empty_clusters_keyed` fills what is empty then.

    Collective when `holders` is: call on every rank.
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
        centroids = centroids_from_sums(total[:, :-1], total[:, -1], scale, centroids, spherical)
        if it < niter - 1:
            centroids, _, _ = split_empty_centroids(centroids, total[:, -1], rng)
    return centroids


def mean_loss(
    holders: Holders,
    x: np.ndarray,
    centroids: np.ndarray,
    labels: np.ndarray,
    max_abs: float,
    n: int,
) -> float:
    """The k-means objective per point, from fixed-point squared distances summed exactly:
    the same bits on any number of holders.

    Collective when `holders` is: call on every rank.
    """
    bound = x.shape[1] * (2.0 * max_abs) ** 2 * 1.01  # centroids are means of the points
    scale = fixed_point_scale(bound, n)
    total = 0
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        q = np.rint(squared_distances(x[s : s + step], centroids, labels[s : s + step]) * scale)
        total += int(q.sum())  # integers below 2**52: exact in any order
    summed = holders.sum(np.array([total], dtype=np.int64))
    return float(summed[0]) / scale / max(1, n)
