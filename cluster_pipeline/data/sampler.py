"""The training sampler: uniform over clusters, identical on every rank, equal steps per rank."""

from __future__ import annotations

import numpy as np


def uniform_cluster_sampler(labels: np.ndarray, num_draws: int, seed: int) -> np.ndarray:
    """Draw `num_draws` sample indices so that every non-empty cluster is drawn equally often.

    DeepCluster's remedy for trivial parametrization: each non-empty cluster contributes
    ceil(num_draws / k_nonempty) draws, taken without replacement from a shuffle of its members
    and cycling through them again only when the cluster is smaller than its share; cutting to
    `num_draws` leaves per-cluster counts equal within one. The result is shuffled. A label of
    -1 (a sample skipped as unreadable) is in no cluster and is never drawn.
    Vectorized: no Python loop over samples or clusters.
    """
    rng = np.random.default_rng(seed)
    keys = rng.random(len(labels))
    members = np.flatnonzero(labels >= 0)
    # Members grouped by cluster, shuffled within; the same order as before -1 labels existed.
    order = members[np.lexsort((keys[members], labels[members]))]
    sizes = np.bincount(labels[members])
    nonempty = np.flatnonzero(sizes)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))[nonempty]
    per = -(-num_draws // len(nonempty))
    j = np.arange(per)
    pos = starts[:, None] + j[None, :] % sizes[nonempty][:, None]
    # Round by round, clusters in random order, so cutting to num_draws leaves counts within one.
    draws = order[pos[rng.permutation(len(nonempty))].T.ravel()[:num_draws]]
    return draws[rng.permutation(len(draws))]


def rank_slice(draws: np.ndarray, rank: int, world: int, batch_size: int) -> np.ndarray:
    """This rank's share of the global draws, cut so every rank takes the same number of steps.

    Equal step counts are what keep DDP's all-reduces matched across ranks.
    """
    steps = len(draws) // (world * batch_size)
    return draws[rank::world][: steps * batch_size]
