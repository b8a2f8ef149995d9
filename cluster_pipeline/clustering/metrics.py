"""Clustering metrics: NMI and ARI, and cluster-size statistics.

NMI (arithmetic normalisation) and ARI are scikit-learn's definitions, computed here from the
non-zero cells of the contingency table, so that rank 0 does not import scikit-learn (1.8 s of
every attempt's first epoch, with every rank waiting), and by chunks of samples, so that the
memory is bounded by the number of non-zero cells, not by N: scikit-learn's own costs several
N-length int64 arrays, some 40 GB at 1B samples. `tests/test_kmeans.py` checks that both give
scikit-learn's bits.

A label of -1 marks a sample skipped as unreadable (data.on_error=skip): the metrics cover the
samples that every labeling given has a label for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from cluster_pipeline.clustering.labels import CHUNK, label_counts

# Cells of the contingency table counted at once (32 MiB of int64): a table of more cells
# (k = 10,000 against the previous epoch's 10,000: 1e8) is counted in blocks of rows.
CELLS = 1 << 22


def _small_labels(x: np.ndarray) -> np.ndarray:
    """`x` itself when its labels are below `CELLS` (cluster ids, classes: counted by
    bincount), else its labels renumbered 0.. in order (-1 kept): arbitrary ids, at the cost
    of one sort of N."""
    if not len(x) or int(x.max()) < CELLS:
        return x
    values, inverse = np.unique(x, return_inverse=True)
    return inverse - int(values[0] < 0)


def _compact(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero counts, and each label's position among the labels that occur."""
    present = counts > 0
    return counts[present], np.cumsum(present) - 1


class _Table:
    """The contingency table of two labelings over the samples both label (>= 0): the counts
    of a's labels and of b's, and the non-zero cells block after block of rows.

    Every pass over the samples goes in chunks of `CHUNK`, and a block holds at most `CELLS`
    cells, so memory is bounded whatever N and k: scikit-learn's sorts several N-length int64
    arrays (some 40 GB at 1B samples). A table of more than `CELLS` cells costs a pass over
    the samples per block."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise ValueError(f"labelings of {len(a)} and {len(b)} samples")
        self.a, self.b = _small_labels(a), _small_labels(b)
        counts_a = np.zeros(int(self.a.max()) + 1 if len(a) else 0, np.int64)
        counts_b = np.zeros(int(self.b.max()) + 1 if len(b) else 0, np.int64)
        for pa, pb in self._pairs():
            counts_a += np.bincount(pa, minlength=len(counts_a))
            counts_b += np.bincount(pb, minlength=len(counts_b))
        self.rows, self.row_id = _compact(counts_a)
        self.cols, self.col_id = _compact(counts_b)
        self.n = int(self.rows.sum())

    def _pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, len(self.a), CHUNK):
            pa, pb = self.a[s : s + CHUNK], self.b[s : s + CHUNK]
            both = (pa >= 0) & (pb >= 0)
            yield pa[both], pb[both]

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(cells, row, column) of the non-zero cells, in row-major order over all blocks."""
        width = len(self.cols)
        per_block = max(1, CELLS // max(width, 1))
        for lo in range(0, len(self.rows), per_block):
            hi = min(lo + per_block, len(self.rows))
            table = np.zeros((hi - lo) * width, np.int64)
            pending: list[np.ndarray] = []
            for pa, pb in self._pairs():
                r = self.row_id[pa]
                mine = (r >= lo) & (r < hi)
                pending.append((r[mine] - lo).astype(np.int64) * width + self.col_id[pb[mine]])
                if sum(map(len, pending)) >= len(table) // 2:  # amortizes bincount's zeroing
                    table += np.bincount(np.concatenate(pending), minlength=len(table))
                    pending = []
            if pending:
                table += np.bincount(np.concatenate(pending), minlength=len(table))
            nonzero = np.flatnonzero(table)
            yield table[nonzero], nonzero // width + lo, nonzero % width


def _entropy(counts: np.ndarray) -> float:
    if len(counts) == 1:
        return 0.0
    p, n = counts.astype(np.float64), float(counts.sum())
    return float(-np.sum((p / n) * (np.log(p) - math.log(n))))


def _mutual_information(t: _Table) -> float:
    """MI of the table, summed over its non-zero cells in row-major order in the same
    floating-point steps as scikit-learn: its bits when the table is one block; the blocks'
    sums added exactly (fsum) otherwise."""
    n = t.n
    partial = []
    for cells, row_of, col_of in t.blocks():
        log_outer = -np.log(t.rows[row_of] * t.cols[col_of]) + math.log(n) + math.log(n)
        p = cells / n
        mi = p * (np.log(cells) - math.log(n)) + p * log_outer
        mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
        partial.append(mi.sum())
    total = partial[0] if len(partial) == 1 else math.fsum(partial)
    return float(np.clip(total, 0.0, None))


def nmi(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """NMI between two labelings of the same samples; None when either is unknown."""
    if a is None or b is None:
        return None
    t = _Table(np.asarray(a), np.asarray(b))
    if len(t.rows) == len(t.cols) <= 1:
        return 1.0  # neither labeling splits the data: a perfect match
    if len(t.rows) == 1 or len(t.cols) == 1:
        return 0.0
    mi = _mutual_information(t)
    if mi == 0:
        return 0.0
    return float(mi / np.mean([_entropy(t.rows), _entropy(t.cols)]))


def ari(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    t = _Table(np.asarray(a), np.asarray(b))
    rows, cols, n = t.rows, t.cols, t.n
    squares = sum(int(np.sum(cells**2)) for cells, _, _ in t.blocks())
    tp = squares - n
    fp = int(np.sum(cols.astype(np.int64) ** 2)) - squares
    fn = int(np.sum(rows.astype(np.int64) ** 2)) - squares
    tn = n * n - fp - fn - squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def cluster_stats(labels: np.ndarray, k: int) -> dict[str, float | int]:
    sizes = label_counts(labels, k)
    return {
        "cluster_size_min": int(sizes.min()),
        "cluster_size_median": float(np.median(sizes)),
        "cluster_size_max": int(sizes.max()),
        "n_empty_clusters": int((sizes == 0).sum()),
    }
