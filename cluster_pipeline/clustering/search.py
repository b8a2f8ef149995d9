"""Nearest-centroid search behind one function, `assign`: on CPU a float32 top-2 search (one
BLAS product a block of rows at a time, `nearest_two`) certified exact, with the exact argmin
where the certificate fails; on GPUs faiss's own answer. Also the bare `faiss.Kmeans` for small
problems outside the pipeline's step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from cluster_pipeline.clustering.exact import FixedColumns, block_rows, exact_bits, exact_matmul
from cluster_pipeline.clustering.labels import LABEL_DTYPE

if TYPE_CHECKING:
    import faiss
    import torch

# Per-row norms and bounds: NumPy arrays on CPU, torch tensors for the torch backend.
Rows = TypeVar("Rows", np.ndarray, "torch.Tensor")

# Rows per search on GPU: large blocks keep the device busy between host copies.
GPU_SEARCH_ROWS = 262_144
# Bytes of the float32 scores of a block of rows against every centroid (`nearest_two`).
SCORE_BYTES = 16 << 20
# float32's unit roundoff.
FLOAT32_U = 2.0**-24


def _faiss() -> Any:
    """faiss, imported where it is used: the CPU search and the torch backend need none (a
    machine without faiss, such as the GPU check's, clusters with cluster.backend=torch)."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "faiss is not installed: pip install faiss-cpu (or '.[gpu]' on a GPU node), or set "
            "cluster.backend=torch"
        ) from exc
    return faiss


def num_gpus() -> int:
    """GPUs faiss can search on: 0 without faiss-gpu (or without faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class GpuSearch:
    """faiss's nearest-centroid search on one GPU (a rank's own, in sharded mode) or on every
    GPU of the machine (`device=None`, rank 0 in gather mode: the centroids on each, the points
    split between them). The GPUs' resources are made once and reused by every search of a
    clustering (each reserves scratch memory on its device)."""

    def __init__(self, device: int | None = None) -> None:
        self.device = device
        count = 1 if device is not None else num_gpus()
        self.resources = [_faiss().StandardGpuResources() for _ in range(count)]

    def index(self, d: int) -> faiss.Index:
        f = _faiss()
        if self.device is not None:
            return f.index_cpu_to_gpu(self.resources[0], self.device, f.IndexFlatL2(d))
        return f.index_cpu_to_gpu_multiple_py(self.resources, f.IndexFlatL2(d))

    def nearest(self, x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        index = self.index(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        labels = np.empty(len(x), dtype=LABEL_DTYPE)
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
    """Index (int32) of every point's nearest centroid in L2, ties to the lowest index.

    On CPU the labels are exactly those of `exact_nearest` for every row, whatever the BLAS
    kernels or thread count: a float32 search (`nearest_two`) gives each point its two nearest
    centroids, and where the gap between them exceeds a bound on float32's rounding error plus
    the exact metric's, its choice is the exact one; the few other rows are searched
    exactly. With `gpu`, faiss's answer on the GPU(s), not promised bitwise. `x_norm`: the rows'
    L2 norms (`row_norms`), when the same rows are assigned again and again (Lloyd).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if gpu is not None:
        return gpu.nearest(x, centroids)
    k, d = centroids.shape
    labels = np.zeros(len(x), dtype=LABEL_DTYPE)
    if k == 1 or not len(x):
        return labels
    c_norm = float(row_norms(centroids).max())
    step = block_rows(d)
    for s in range(0, len(x), step):
        part = x[s : s + step]
        best, gap = nearest_two(part, centroids)
        norms = row_norms(part) if x_norm is None else x_norm[s : s + step]
        unsure = np.flatnonzero(~(gap > search_margin(norms, c_norm, d)))
        labels[s : s + len(part)] = best
        if len(unsure):
            labels[s + unsure] = exact_nearest(part[unsure], centroids)
    return labels


def nearest_two(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid by float32 |c|^2 - 2 x.c (ties to the lowest index) and the
    gap from it to the second nearest (float64), from one float32 BLAS product a block of rows
    at a time. faiss's flat search for 2 neighbours does the same product, then a heap per
    row: 1.6x the time of these vectorized passes at 1,000 centroids. The values are within
    `faiss_distance_error` of the exact ones, as faiss's are."""
    k = len(centroids)
    minus_two_ct = np.ascontiguousarray(centroids.T * np.float32(-2.0))  # exact: a power of 2
    c_sq = np.square(centroids, dtype=np.float64).sum(axis=1).astype(np.float32)
    step = max(1, SCORE_BYTES // (4 * k))
    scores = np.empty((min(step, len(x)), k), dtype=np.float32)  # reused: no fresh pages
    best = np.empty(len(x), dtype=LABEL_DTYPE)
    gap = np.empty(len(x), dtype=np.float64)
    for s in range(0, len(x), step):
        part = x[s : s + step]
        block = scores[: len(part)]
        np.matmul(part, minus_two_ct, out=block)
        block += c_sq
        first = block.argmin(axis=1)
        rows = np.arange(len(part))
        low = block[rows, first].astype(np.float64)
        block[rows, first] = np.inf
        gap[s : s + len(part)] = block.min(axis=1) - low  # float32 values: exact in float64
        best[s : s + len(part)] = first
    return best, gap


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row, float64."""
    out = np.empty(len(x), dtype=np.float64)
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        out[s : s + step] = np.sqrt(np.square(x[s : s + step], dtype=np.float64).sum(axis=1))
    return out


def search_margin(x_norm: Rows, c_norm: float, d: int) -> Rows:
    """How much the float32 top-2 gap must exceed for its nearest centroid to be the exact one.

    The exact argmin is within 2 (eps + delta) of the float32 best value, eps bounding float32's
    error (`faiss_distance_error`) and delta `exact_nearest`'s (`exact_metric_error`); a
    larger gap to the float32 second best proves the float32 best is it. Twice that is the margin.
    """
    return 4.0 * (faiss_distance_error(x_norm, c_norm, d) + exact_metric_error(x_norm, c_norm, d))


def faiss_distance_error(x_norm: Rows, c_norm: float, d: int) -> Rows:
    """A bound on the error of a float32 squared distance from x to any centroid of norm
    <= c_norm, faiss's or `nearest_two`'s: |x|^2 + |c|^2 - 2 x.c (or a sum of squared differences):
    whatever the kernel and summation order, a length-d float32 sum is off by at most
    gamma_d = d u / (1 - d u) of the sum of its absolute terms, and each of the two additions
    by u, so the error is below (d + 3) u (|x| + |c|)^2 up to second order in u."""
    return 1.25 * (d + 4) * FLOAT32_U * (x_norm + c_norm) ** 2


def exact_metric_error(x_norm: Rows, c_norm: float, d: int) -> Rows:
    """A bound on how far `exact_nearest`'s |c|^2 - 2 x.c, plus |x|^2, is from the squared
    distance: x and c are rounded to A and B bits (`exact_matmul`), which moves each by at
    most sqrt(d) 2^-A |x| (2^-B |c|)."""
    a_bits, b_bits = exact_bits(d)
    return 2.1 * math.sqrt(d) * (2.0**-a_bits + 2.0**-b_bits) * x_norm * c_norm


def exact_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """argmin over centroids of |c|^2 - 2 x.c with x.c from `exact_matmul`: every value is a
    deterministic function of (x, c), so the first minimum is the same on any machine."""
    c_sq = np.square(centroids, dtype=np.float64).sum(axis=1)
    cols = FixedColumns.of(centroids.T)
    labels = np.empty(len(x), dtype=LABEL_DTYPE)
    step = block_rows(len(centroids))
    for s in range(0, len(x), step):
        scores = exact_matmul(x[s : s + step], cols)
        scores *= -2.0
        scores += c_sq
        labels[s : s + len(scores)] = scores.argmin(axis=1)
    return labels


def faiss_kmeans(
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
    and BLAS search are not promised bitwise; `kmeans.cluster` is."""
    n, d = x.shape
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} points to cluster")
    gpus = num_gpus() if use_gpu else 0
    km = _faiss().Kmeans(
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
