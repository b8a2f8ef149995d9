"""Clustering metrics: NMI and ARI (scikit-learn) and cluster-size statistics.

A label of -1 marks a sample skipped as unreadable (data.on_error=skip): the metrics cover the
samples that every labeling given has a label for. scikit-learn is imported by the first metric
computed (rank 0's), not by every rank: it costs a second of each process's start-up.
"""

from __future__ import annotations

import numpy as np


def _labelled(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    both = (a >= 0) & (b >= 0)
    return (a, b) if both.all() else (a[both], b[both])


def nmi(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """NMI between two labelings of the same samples; None when either is unknown."""
    if a is None or b is None:
        return None
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(*_labelled(a, b)))


def ari(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(*_labelled(a, b)))


def cluster_stats(labels: np.ndarray, k: int) -> dict[str, float | int]:
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    return {
        "cluster_size_min": int(sizes.min()),
        "cluster_size_median": float(np.median(sizes)),
        "cluster_size_max": int(sizes.max()),
        "n_empty_clusters": int((sizes == 0).sum()),
    }
