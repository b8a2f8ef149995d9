"""Empty clusters: faiss's split during Lloyd's iterations (decided on the sizes alone) and
DeepCluster's split after the last assignment, on rows all here (`split_empty_clusters`) or
spread over holders that decide alike (`split_empty_clusters_keyed`).
"""

from __future__ import annotations

import numpy as np

from cluster_pipeline.clustering.exact import centroids_from_sums, cluster_sums, to_fixed_point
from cluster_pipeline.clustering.holders import Holders
from cluster_pipeline.clustering.keys import coin

# Rounds of the empty-cluster split before giving up: a round fails for a donor only when its
# points are duplicates and every coin fell on one side (probability <= 1/2 per round).
MAX_SPLIT_ROUNDS = 64


def split_empty_centroids(
    centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """faiss's fix for a cluster that empties during the Lloyd iterations, decided on the
    cluster sizes alone (so every rank decides alike): the empty cluster takes a copy of a
    cluster picked with probability proportional to its size minus one, the two copies are
    pushed apart by a relative 1/1024, and the next assignment separates their points.
    Returns (centroids, counts as the split assumes them, number split).
    """
    centroids, counts = centroids.copy(), counts.copy()
    eps = np.float32(1 / 1024)
    signs = np.where(np.arange(centroids.shape[1]) % 2 == 0, eps, -eps).astype(np.float32)
    empty = np.flatnonzero(counts == 0)
    for e in empty:
        weight = np.maximum(counts - 1, 0).astype(np.float64)
        if weight.sum() == 0:
            break
        donor = int(rng.choice(len(counts), p=weight / weight.sum()))
        centroids[e] = centroids[donor] * (1 + signs)
        centroids[donor] = centroids[donor] * (1 - signs)
        counts[e] = counts[donor] // 2
        counts[donor] -= counts[e]
    return centroids, counts, len(empty)


# ------------------------------------------------------------- DeepCluster's empty-cluster split


def choose_donor(sizes: np.ndarray, rng: np.random.Generator) -> int:
    """A cluster to split, with probability proportional to its size among those with >= 2."""
    splittable = np.where(sizes >= 2, sizes, 0).astype(np.float64)
    return int(rng.choice(len(sizes), p=splittable / splittable.sum()))


def perturbed_pair(centroid: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """(2, d): the donor's centroid pushed +eps (for the empty cluster) and -eps (the donor)."""
    noise = eps * rng.standard_normal(len(centroid), dtype=np.float32)
    scale = np.abs(centroid).mean() + eps
    return np.stack([centroid + noise * scale, centroid - noise * scale])


def closer_to_first(x: np.ndarray, pair: np.ndarray) -> np.ndarray:
    """Which rows are nearer to pair[0] than to pair[1]."""
    d2 = ((x[:, None, :] - pair[None, :, :]) ** 2).sum(-1)
    return d2[:, 0] < d2[:, 1]


def split_empty_clusters(
    x: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    rng: np.random.Generator,
    eps: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, int]:
    """DeepCluster's fix for empty clusters, applied until none is empty (needs N >= k), on
    points that are all here and carry no sample index (the specialists' columns).

    For each empty cluster: pick a non-empty cluster with probability proportional to its size
    (among those with at least two points, which exist while any cluster is empty and N >= k),
    give the empty cluster a copy of its centroid perturbed by +eps and the donor -eps, and split
    the donor's points between the two by nearest centroid. When the perturbation does not
    separate them (duplicate points), the points are split in two random halves. Both centroids
    are then moved to the mean of their points. Returns (labels, centroids, empty count before).
    The clustering step uses `split_empty_clusters_keyed`, which decides alike on every rank.
    """
    labels = labels.copy()
    centroids = centroids.copy()
    k = len(centroids)
    if len(x) < k:
        raise ValueError(f"cannot fill {k} clusters from {len(x)} points")
    sizes = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(sizes == 0)
    for e in empty:
        donor = choose_donor(sizes, rng)
        members = np.flatnonzero(labels == donor)
        to_new = closer_to_first(x[members], perturbed_pair(centroids[donor], eps, rng))
        if to_new.all() or not to_new.any():
            to_new = np.zeros(len(members), dtype=bool)
            to_new[rng.permutation(len(members))[: len(members) // 2]] = True
        labels[members[to_new]] = e
        centroids[e] = x[members[to_new]].mean(axis=0)
        centroids[donor] = x[members[~to_new]].mean(axis=0)
        sizes[e] = int(to_new.sum())
        sizes[donor] -= sizes[e]
    return labels, centroids, len(empty)


def split_empty_clusters_keyed(
    holders: Holders,
    x: np.ndarray,
    index: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    scale: float,
    seed: int,
    eps: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, int]:
    """DeepCluster's split (`split_empty_clusters`) with every holder moving its own points
    and deciding alike.

    The donor and the perturbation come from the global sizes and a generator seeded alike on
    every holder. The donor's points go to the nearer of the two perturbed centroids; when that
    leaves one side empty (duplicates), they go by a coin keyed by sample index instead of in
    random halves, and when the coins fall on one side too, the empty cluster waits for the next
    round (fresh coins). One sum over holders of 4 x (d + 1) int64 per split. Returns (labels,
    centroids, number empty before).

    Collective when `holders` is: call on every rank.
    """
    k, d = centroids.shape
    labels, centroids = labels.copy(), centroids.copy()
    sizes = holders.sum(np.bincount(labels, minlength=k).astype(np.int64))
    if sizes.sum() < k:
        raise ValueError(f"cannot fill {k} clusters from {sizes.sum()} points")
    rng = np.random.default_rng(seed)
    n_empty = int((sizes == 0).sum())
    for attempt in range(MAX_SPLIT_ROUNDS):
        empty = np.flatnonzero(sizes == 0)
        if not len(empty):
            return labels, centroids, n_empty
        for e in empty.tolist():
            donor = choose_donor(sizes, rng)
            members = np.flatnonzero(labels == donor)
            pair = perturbed_pair(centroids[donor], eps, rng)
            sides = (
                closer_to_first(x[members], pair),
                coin(index[members], seed, salt=attempt * k + e),
            )
            q = to_fixed_point(x[members], scale)
            parts = [cluster_sums(q, (~s).astype(np.int64), 2) for s in sides]
            packed = np.concatenate([np.concatenate([s, c[:, None]], axis=1) for s, c in parts])
            total = holders.sum(packed).reshape(2, 2, d + 1)
            for side, sums in zip(sides, total, strict=True):
                if sums[0, -1] and sums[1, -1]:  # both halves non-empty
                    labels[members[side]] = e
                    both = np.array([e, donor])
                    centroids[both] = centroids_from_sums(
                        sums[:, :-1], sums[:, -1], scale, centroids[both]
                    )
                    sizes[e], sizes[donor] = sums[:, -1]
                    break
    raise RuntimeError(
        f"{int((sizes == 0).sum())} clusters still empty after {MAX_SPLIT_ROUNDS} rounds of "
        f"splitting (k={k}, {sizes.sum()} points): every coin fell on one side, which should "
        "not happen"
    )
