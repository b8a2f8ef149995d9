"""DeepCluster's preprocessing as pure functions on arrays: PCA fitted on a keyed sample of the
rows, whitening, L2 normalization. Fitted and applied with exact products (`exact`), so a row
gets the same bits whichever array, rank or position it is projected in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from cluster_pipeline.clustering.exact import (
    FixedColumns,
    block_rows,
    exact_bits,
    exact_matmul,
    power_of_two_scale,
)
from cluster_pipeline.clustering.keys import SALT_PCA, keep_fraction

if TYPE_CHECKING:  # the type only: holders.py imports this module
    from cluster_pipeline.clustering.holders import Holders

# PCA is fitted on about this many rows: the covariance is well estimated long before 1M rows.
PCA_FIT_MAX_ROWS = 200_000
# Rows per block of the covariance: each block's Gram matrix is exact (see `covariance`).
GRAM_ROWS = 4096


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
    # Two work arrays for every block: fresh 64 MiB arrays per block would be mapped and
    # faulted in anew each time, which costs more than the products on some machines.
    work = np.empty((min(GRAM_ROWS, len(x)), d), dtype=np.float64)
    block = np.empty((d, d), dtype=np.float64)
    for s in range(0, len(x), GRAM_ROWS):
        q = work[: len(x[s : s + GRAM_ROWS])]
        np.subtract(x[s : s + GRAM_ROWS], mean, out=q)
        bits = min(exact_bits(len(q)))
        top = np.maximum(q.max(axis=0, initial=0.0), -q.min(axis=0, initial=0.0))
        scale = power_of_two_scale(top, bits)
        q *= scale
        np.rint(q, out=q)
        np.matmul(q.T, q, out=block)
        block /= scale[:, None]  # powers of two: exact
        block /= scale[None, :]
        gram += block
    return gram / max(1, len(x) - 1)


@dataclass(frozen=True)
class PCA:
    mean: np.ndarray  # (d_in,) float32
    proj: np.ndarray  # (d_in, d_out) float32; columns scaled by 1/sqrt(eigenvalue) when whitening
    # Fitted and applied with exact products (CPU clustering); False: float32 BLAS, for a
    # clustering whose search runs on GPUs and is not bitwise anyway (5x faster on the CPU).
    exact: bool = True
    # A torch device ("cuda:0") to fit and apply on (`pca_torch`); None: NumPy on the host.
    device: str | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) @ proj in float32, exact row by row (`exact_matmul`): a row gets the same
        bits whichever array, rank or position it is projected in. On `device`: torch's float32
        product there."""
        if self.device is not None:
            from cluster_pipeline.clustering import pca_torch

            return pca_torch.apply(x, self.mean, self.proj, self.device)
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
    device: str | None = None,
) -> PCA:
    """Top-`dim` principal directions of `x`, optionally scaled to unit variance (whitening).

    Above PCA_FIT_MAX_ROWS rows, a sample of rows chosen by `keep_fraction` is fitted. `exact`
    (see PCA.exact): an exact covariance, and LAPACK on one thread. `device`: the covariance
    and its eigendecomposition in float64 with torch there (`pca_torch`), and the PCA applied
    there. Each component's sign makes its largest entry positive, whatever the solver.
    """
    n, d = x.shape
    if not 0 < dim <= d:
        raise ValueError(f"PCA dimension {dim} must be in 1..{d} (the feature dimension)")
    if n > PCA_FIT_MAX_ROWS:
        x = x[keep_fraction(np.arange(n), PCA_FIT_MAX_ROWS / n, seed, SALT_PCA)]
    import scipy.linalg  # here, not at import: a rank that never fits a PCA starts faster

    mean = x.mean(axis=0, dtype=np.float64)
    if device is not None:
        from cluster_pipeline.clustering import pca_torch

        evals, evecs = pca_torch.covariance_eigh(x, mean, dim, device)
    else:
        cov = covariance(x, mean, exact)
        with threadpool_limits(1 if exact else None, user_api="blas"):  # LAPACK's bits: threads
            evals, evecs = scipy.linalg.eigh(cov, subset_by_index=[d - dim, d - 1])
    top = np.argsort(evals, kind="stable")[::-1]  # descending variance
    proj = evecs[:, top] * component_signs(evecs[:, top])
    if whiten:
        proj = proj / np.sqrt(np.maximum(evals[top], 0.0) + eps)
    return PCA(mean=mean.astype(np.float32), proj=proj.astype(np.float32), exact=exact,
               device=device)  # fmt: skip


def component_signs(vectors: np.ndarray) -> np.ndarray:
    """+1 or -1 per column: the sign that makes the column's largest-magnitude entry (the
    first such) positive. An eigenvector is only defined up to its sign, which LAPACK and
    torch choose differently; k-means does not care, but a PCA compared across them does."""
    at = np.abs(vectors).argmax(axis=0)
    return np.where(vectors[at, np.arange(vectors.shape[1])] < 0, -1.0, 1.0)


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


def fit_pca_on_sample(
    holders: Holders,
    index: np.ndarray,
    feats: np.ndarray,
    num_rows: int,
    dim: int,
    whiten: bool,
    seed: int,
    exact: bool = True,
    device: str | None = None,
) -> PCA:
    """PCA fitted once from about PCA_FIT_MAX_ROWS of the `num_rows` rows, each kept by its
    sample's key whichever holder has it. Below that many rows every row is kept. `device`:
    fitted and applied with torch there (this holder's GPU).

    Collective when `holders` is: call on every rank.
    """
    keep = keep_fraction(index, PCA_FIT_MAX_ROWS / num_rows, seed, SALT_PCA)
    if keep.all():  # no copy of every row (N x d) when all of them are the sample
        return holders.fit_pca(index, feats, dim, whiten, seed, exact, device)
    return holders.fit_pca(index[keep], feats[keep], dim, whiten, seed, exact, device)
