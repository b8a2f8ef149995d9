"""Clustering metrics: NMI and ARI (scikit-learn) and cluster-size statistics."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def nmi(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """NMI between two labelings of the same samples; None when either is unknown."""
    if a is None or b is None:
        return None
    return float(normalized_mutual_info_score(a, b))


def ari(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    return float(adjusted_rand_score(a, b))


def cluster_stats(labels: np.ndarray, k: int) -> dict[str, float | int]:
    sizes = np.bincount(labels, minlength=k)
    return {
        "cluster_size_min": int(sizes.min()),
        "cluster_size_median": float(np.median(sizes)),
        "cluster_size_max": int(sizes.max()),
        "n_empty_clusters": int((sizes == 0).sum()),
    }
