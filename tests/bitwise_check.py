"""The clustering step's bitwise promises, checked within one process: its results are functions
of the values and the seed, not of a row's position or its array's length, the alignment of the
memory, the number of BLAS or OpenMP threads, or the order of the rows.

`test_bitwise.py` runs these checks in the test process and, through `main`, in subprocesses
whose environment forces other CPU kernels (AVX2 only, as on an AMD EPYC; AVX without FMA) and
more threads than cores: `python tests/bitwise_check.py` prints one "ok <check>" line each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from cluster_pipeline.clustering import exact, pca, search
from cluster_pipeline.clustering.kmeans import cluster_features
from cluster_pipeline.config import ClusterConfig


@contextmanager
def threads(n: int) -> Iterator[None]:
    """n BLAS threads (numpy's, scipy's and faiss's OpenBLAS) and n OpenMP threads in faiss."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        faiss.omp_set_num_threads(before)


def misaligned(x: np.ndarray, offset_bytes: int = 4) -> np.ndarray:
    """A copy of `x` whose data starts `offset_bytes` past a 64-byte boundary."""
    raw = np.empty(x.nbytes + 64 + offset_bytes, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + offset_bytes
    out = raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    assert out.ctypes.data % 64 == offset_bytes
    return out


def features(n: int = 3000, d: int = 64, seed: int = 0) -> np.ndarray:
    """ReLU features of overlapping blobs with a decaying spectrum, float32."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(12, d)) * 2.0
    x = centers[rng.integers(0, 12, n)] + rng.normal(size=(n, d)) / np.sqrt(1.0 + np.arange(d))
    return np.maximum(x, 0.0).astype(np.float32)


def check_exact_matmul() -> None:
    """Exact: integer operands within the bit budget come out as int64 arithmetic gives them,
    and a row's result is the same computed alone."""
    rng = np.random.default_rng(1)
    a_bits, b_bits = exact.exact_bits(300)
    a = rng.integers(-(2**a_bits) + 1, 2**a_bits, size=(50, 300))
    b = rng.integers(-(2**b_bits) + 1, 2**b_bits, size=(300, 7))
    want = a @ b  # int64, exact: |sum| < 300 * 2**44
    np.testing.assert_array_equal(exact.exact_matmul(a.astype(np.float64), b), want)
    x = rng.normal(size=(400, 300)).astype(np.float32)
    w = rng.normal(size=(300, 7)).astype(np.float32)
    full = exact.exact_matmul(x, w)
    for i in (0, 1, 17, 399):
        np.testing.assert_array_equal(exact.exact_matmul(x[i : i + 1], w)[0], full[i])
    with threads(1):
        np.testing.assert_array_equal(exact.exact_matmul(misaligned(x), w), full)


def check_projection() -> None:
    """project(x)[rows] is project(x[rows]), at any offset, length, alignment or thread count."""
    x = features()
    fitted = pca.fit_pca(x, 16)
    full = pca.project(x, fitted)
    perm = np.random.default_rng(2).permutation(len(x))
    np.testing.assert_array_equal(pca.project(x[perm], fitted), full[perm])
    for start, length in ((0, 1), (1, 700), (5, 2294), (3, 17), (2999, 1)):
        part = slice(start, start + length)
        np.testing.assert_array_equal(pca.project(x[part], fitted), full[part], str(part))
    for n in (1, 2):
        with threads(n):
            np.testing.assert_array_equal(pca.project(misaligned(x), fitted), full)


def check_fit_pca() -> None:
    """The same matrix gives the same PCA with any thread count and alignment."""
    x = features(d=512)  # LAPACK threads its work from a few hundred columns on
    with threads(1):
        one = pca.fit_pca(x, 24)
    for n in (2, 3):
        with threads(n):
            other = pca.fit_pca(misaligned(x, 12), 24)
        np.testing.assert_array_equal(other.proj, one.proj)
        np.testing.assert_array_equal(other.mean, one.mean)


def near_ties(n: int = 2000, d: int = 32, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Points within float32 rounding of equidistant from two of the centroids, and others."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(40, d)).astype(np.float32)
    a, b = centroids[0].astype(np.float64), centroids[1].astype(np.float64)
    axis = (b - a) / np.linalg.norm(b - a)
    along = rng.normal(size=(n, d))
    along -= np.outer(along @ axis, axis)  # in the bisecting hyperplane
    ties = (a + b) / 2 + 0.3 * along + np.outer(rng.normal(size=n) * 1e-7, axis)
    return np.concatenate([ties, rng.normal(size=(n, d))]).astype(np.float32), centroids


def check_assign() -> None:
    """assign's labels are exact_nearest's for every row, near-ties included; the exact path
    did run for them; and no thread count, offset or alignment changes a label."""
    x, centroids = near_ties()
    exact = search.exact_nearest(x, centroids)
    calls: list[int] = []
    real = search.exact_nearest

    def counting(rows: np.ndarray, c: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return real(rows, c)

    search.exact_nearest = counting  # type: ignore[assignment]
    try:
        labels = search.assign(x, centroids)
    finally:
        search.exact_nearest = real  # type: ignore[assignment]
    np.testing.assert_array_equal(labels, exact)
    assert sum(calls) >= len(x) // 4, calls  # most near-ties were settled exactly
    assert set(np.unique(labels[: len(x) // 2])) <= {0, 1}
    for n in (1, 2, 3):
        with threads(n):
            np.testing.assert_array_equal(search.assign(misaligned(x), centroids), exact)
            np.testing.assert_array_equal(search.assign(x[5:1777], centroids), exact[5:1777])


def check_faiss_error_bound() -> None:
    """faiss's float32 squared distances are within `faiss_distance_error` of the exact ones,
    at several scales and dimensions: the bound `assign`'s certificate rests on."""
    rng = np.random.default_rng(4)
    for d, scale in ((8, 1e-3), (64, 1.0), (256, 1.0), (256, 1e3), (1000, 7.0)):
        x = (rng.normal(size=(1000, d)) * scale).astype(np.float32)
        c = (rng.normal(size=(32, d)) * scale).astype(np.float32)
        x[:100] = c[rng.integers(0, 32, 100)]  # distance 0: cancellation in |x|^2 + |c|^2 - 2xc
        index = faiss.IndexFlatL2(d)
        index.add(c)
        dist, ids = index.search(x, len(c))
        exact = np.square(x[:, None, :].astype(np.float64) - c[ids].astype(np.float64)).sum(-1)
        x_norm = np.linalg.norm(x.astype(np.float64), axis=1)
        c_norm = float(np.linalg.norm(c.astype(np.float64), axis=1).max())
        bound = search.faiss_distance_error(x_norm, c_norm, d)[:, None]
        worst = float((np.abs(dist - exact) / bound).max())
        assert worst < 1.0, f"d={d} scale={scale}: error {worst:.2f} x the bound"


def check_clustering() -> None:
    """The whole step: the same labels, centroids and loss with 1 or more threads, rows in
    another order (index permuted alike) or misaligned, empty clusters split included."""
    x = features(n=2500)
    c = ClusterConfig(k=40, pca_dim=16, niter=8, use_gpu=False)
    with threads(1):
        ref = cluster_features(x, c, seed=5)
    perm = np.random.default_rng(6).permutation(len(x))
    for n in (2, 3):
        with threads(n):
            other = cluster_features(misaligned(x[perm]), c, seed=5, index=perm)
        np.testing.assert_array_equal(other.labels, ref.labels[perm])
        np.testing.assert_array_equal(other.centroids, ref.centroids)
        assert other.loss == ref.loss and other.n_empty_before_split == ref.n_empty_before_split
    dup = np.repeat(features(n=30, d=8), 4, axis=0)  # 30 distinct points into 90 clusters
    c = ClusterConfig(k=90, pca_dim=0, l2_normalize=False, niter=4, use_gpu=False)
    with threads(1):
        a = cluster_features(dup, c, seed=5)
    with threads(3):
        b = cluster_features(misaligned(dup), c, seed=5)
    assert a.n_empty_before_split >= 60
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)


CHECKS: dict[str, Callable[[], None]] = {
    "exact_matmul": check_exact_matmul,
    "projection": check_projection,
    "fit_pca": check_fit_pca,
    "assign": check_assign,
    "faiss_error_bound": check_faiss_error_bound,
    "clustering": check_clustering,
}


def main() -> int:
    for name, check in CHECKS.items():
        check()
        print(f"ok {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
