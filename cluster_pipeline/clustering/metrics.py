"""Clustering metrics: NMI and ARI, and cluster-size statistics.

NMI (arithmetic normalisation) and ARI are scikit-learn's definitions, computed here from the
non-zero cells of the contingency table (one sort of N pair codes), so that rank 0 does not
import scikit-learn (1.8 s of every attempt's first epoch, with every rank waiting) and the
memory is a few N-length arrays whatever k. `tests/test_kmeans.py` checks that both give
scikit-learn's bits.

A label of -1 marks a sample skipped as unreadable (data.on_error=skip): the metrics cover the
samples that every labeling given has a label for.
"""

from __future__ import annotations

import math

import numpy as np


def _labelled(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    both = (a >= 0) & (b >= 0)
    return (a, b) if both.all() else (a[both], b[both])


def _contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
    """The counts of a's labels and of b's, the non-zero cells of their table in row-major
    order, and each cell's row and column."""
    _, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    codes, cells = np.unique(ia.astype(np.int64) * len(ub) + ib, return_counts=True)
    return np.bincount(ia), np.bincount(ib), cells, codes // len(ub), codes % len(ub)


def _entropy(counts: np.ndarray) -> float:
    if len(counts) == 1:
        return 0.0
    p, n = counts.astype(np.float64), float(counts.sum())
    return float(-np.sum((p / n) * (np.log(p) - math.log(n))))


def _mutual_information(rows: np.ndarray, cols: np.ndarray, cells: np.ndarray,
                        row_of: np.ndarray, col_of: np.ndarray) -> float:  # fmt: skip
    """MI of the table, summed over its non-zero cells in row-major order, in the same
    floating-point steps as scikit-learn: the same bits as the NMI of runs before this code."""
    n = int(cells.sum())
    log_outer = -np.log(rows[row_of] * cols[col_of]) + math.log(n) + math.log(n)
    p = cells / n
    mi = p * (np.log(cells) - math.log(n)) + p * log_outer
    mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
    return float(np.clip(mi.sum(), 0.0, None))


def nmi(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """NMI between two labelings of the same samples; None when either is unknown."""
    if a is None or b is None:
        return None
    rows, cols, cells, row_of, col_of = _contingency(*_labelled(np.asarray(a), np.asarray(b)))
    if len(rows) == len(cols) <= 1:
        return 1.0  # neither labeling splits the data: a perfect match
    if len(rows) == 1 or len(cols) == 1:
        return 0.0
    mi = _mutual_information(rows, cols, cells, row_of, col_of)
    if mi == 0:
        return 0.0
    return float(mi / np.mean([_entropy(rows), _entropy(cols)]))


def ari(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    rows, cols, cells, _, _ = _contingency(*_labelled(np.asarray(a), np.asarray(b)))
    n = int(rows.sum())
    squares = int(np.sum(cells.astype(np.int64) ** 2))
    tp = squares - n
    fp = int(np.sum(cols.astype(np.int64) ** 2)) - squares
    fn = int(np.sum(rows.astype(np.int64) ** 2)) - squares
    tn = n * n - fp - fn - squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def cluster_stats(labels: np.ndarray, k: int) -> dict[str, float | int]:
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    return {
        "cluster_size_min": int(sizes.min()),
        "cluster_size_median": float(np.median(sizes)),
        "cluster_size_max": int(sizes.max()),
        "n_empty_clusters": int((sizes == 0).sum()),
    }
