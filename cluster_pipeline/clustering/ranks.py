"""The ranks of a process group as `holders.Holders` (cluster.mode=sharded): the sharded k-means
reductions, each a composition of `dist` primitives.

Only small things travel: k x (d + 1) int64 sums, a few scalars, k candidate indices per rank,
the PCA's sample (to rank 0) and the fitted PCA (from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster_pipeline import dist
from cluster_pipeline.clustering import pca


@dataclass(frozen=True)
class Ranks:
    """`holders.Holders` over the ranks of a process group: each method is a collective."""

    ctx: dist.DistContext

    def sum(self, values: np.ndarray) -> np.ndarray:
        """int64 sums are exact, so the result does not depend on the reduction order."""
        return dist.all_reduce(self.ctx, values)

    def max(self, value: float) -> float:
        return float(dist.all_reduce(self.ctx, np.array([value], np.float64), "max")[0])

    def concat(self, values: np.ndarray) -> np.ndarray:
        return np.concatenate(dist.all_gather(self.ctx, np.asarray(values, dtype=np.int64)))

    def fit_pca(
        self,
        index: np.ndarray,
        rows: np.ndarray,
        dim: int,
        whiten: bool,
        seed: int,
        exact: bool,
        device: str | None = None,
    ) -> pca.PCA:
        """The rows sent to rank 0 (sorted by sample index there), fitted (on rank 0's
        `device`), and the PCA broadcast: no rank fits its own; each applies it on its own."""
        sample = gather_rows(self.ctx, index, rows)

        def fit() -> pca.PCA:
            assert sample is not None
            return pca.fit_pca(sample[1], dim, whiten=whiten, seed=seed, exact=exact,
                               device=device)  # fmt: skip

        fitted = dist.on_rank0(self.ctx, fit)
        d = rows.shape[1]
        mean = dist.broadcast(self.ctx, None if fitted is None else fitted.mean, (d,), np.float32)
        proj = dist.broadcast(
            self.ctx, None if fitted is None else fitted.proj, (d, dim), np.float32
        )
        return pca.PCA(mean=mean, proj=proj, exact=exact, device=device)


def gather_rows(
    ctx: dist.DistContext, index: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Every rank's (sample index, row) pairs on rank 0, sorted by sample index; None elsewhere.
    For a bounded sample (the PCA fit's), not for all N rows: rank 0 holds the result whole.

    Collective: call on every rank.
    """
    indices = dist.gather(ctx, np.asarray(index, dtype=np.int64))
    parts = dist.gather(ctx, np.asarray(rows, dtype=np.float32))
    if indices is None or parts is None:
        return None
    all_index = np.concatenate(indices)
    order = np.argsort(all_index, kind="stable")
    return all_index[order], np.concatenate(parts)[order]
