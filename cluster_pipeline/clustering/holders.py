"""Where the rows being clustered are: `LOCAL` (this process holds every row) or the ranks of
a process group (sharded.Ranks). `kmeans.cluster` runs over either alike.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cluster_pipeline.clustering.pca import PCA, fit_pca


class Holders(Protocol):
    """Where the rows being clustered are, and how what each holder computed is combined.

    `LOCAL`: this process holds every row. sharded.Ranks: every rank holds some, and
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
        self,
        index: np.ndarray,
        rows: np.ndarray,
        dim: int,
        whiten: bool,
        seed: int,
        exact: bool,
        device: str | None = None,
    ) -> PCA:
        """`fit_pca` of every holder's `rows` together, in order of `index`, fitted once; the
        PCA on every holder, applied on its own `device` (None: NumPy)."""
        ...


class _Local:
    def sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def max(self, value: float) -> float:
        return float(value)

    def concat(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)

    def fit_pca(
        self,
        index: np.ndarray,
        rows: np.ndarray,
        dim: int,
        whiten: bool,
        seed: int,
        exact: bool,
        device: str | None = None,
    ) -> PCA:
        if len(index) > 1 and not (np.diff(index) > 0).all():  # gathered rows come sorted
            rows = rows[np.argsort(index, kind="stable")]
        return fit_pca(rows, dim, whiten=whiten, seed=seed, exact=exact, device=device)


LOCAL: Holders = _Local()
