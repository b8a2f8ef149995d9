"""The training sampler: uniform over clusters, identical on every rank, equal steps per rank."""

from __future__ import annotations

import numpy as np

from cluster_pipeline.clustering.keys import SALT_DRAWS, SALT_MEMBERS, permuted
from cluster_pipeline.clustering.labels import LABEL_DTYPE, label_counts

# The sampler a run draws with (train.sampler), kept in its checkpoints' position so that a
# run continues bit-exactly with the one it started with: 1 before int32 labels, 2 since.
SAMPLER_VERSION = 2

# Entries per chunk of the passes over N: small, so the chunks' temporaries (some 60 bytes an
# entry) stay a sliver of the N-length vectors.
CHUNK = 1 << 16


def uniform_cluster_sampler(
    labels: np.ndarray, num_draws: int, seed: int, rank: int = 0, world: int = 1
) -> np.ndarray:
    """Positions rank, rank + world, ... of `num_draws` sample indices (int32) drawn so that
    every non-empty cluster is drawn equally often; with world=1, all of them.

    DeepCluster's remedy for trivial parametrization: each non-empty cluster contributes
    num_draws // k_nonempty draws, plus one for a random `num_draws % k_nonempty` of them, so
    per-cluster counts are equal within one over the ranks' draws together. A cluster's draws
    are its members in a random order, cycling through them again only when it is smaller
    than its share. The draws are in a random order. A label of -1 (a sample skipped as
    unreadable) is in no cluster and is never drawn.

    Both random orders are keyed permutations (`keys.permuted`) computed a chunk at a time,
    so besides `labels` the sampler holds one N-length int32 vector (the members grouped by
    cluster) and this rank's num_draws / world draws: 1B samples cost 4 GB here, not the
    50 GB of int64 keys, orders and positions of version 1. Every rank draws the same
    sequence and keeps its own positions. Vectorized within chunks: no Python loop over
    samples or clusters.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    sizes = label_counts(labels)
    nonempty = np.flatnonzero(sizes)
    if not len(nonempty):
        raise ValueError("no sample has a label: every sample was skipped, nothing to draw")
    starts = np.cumsum(sizes) - sizes
    # Members grouped by cluster, in a random order within each: a counting sort, by chunks,
    # of 0..N-1 in a random order.
    members = np.empty(int(sizes.sum()), dtype=LABEL_DTYPE)
    cursor = starts.copy()
    for s in range(0, n, CHUNK):
        idx = permuted(np.arange(s, min(s + CHUNK, n)), n, seed, SALT_MEMBERS)
        lab = labels[idx]
        keep = lab >= 0
        idx, lab = idx[keep], lab[keep]
        # Any deterministic sort keeps members in a uniformly random order (their order in
        # the permutation is); as uint16, k < 65536, numpy's is a radix sort, 2.5x faster.
        by_label = np.argsort(lab.astype(np.uint16) if len(sizes) <= 1 << 16 else lab,
                              kind="stable")  # fmt: skip
        lab = lab[by_label]
        counts = np.bincount(lab, minlength=len(sizes))
        rank_in_label = np.arange(len(lab)) - (np.cumsum(counts) - counts)[lab]
        members[cursor[lab] + rank_in_label] = idx[by_label]
        cursor += counts
    # Draw f is round f // kn of cluster f % kn; the last, partial round goes to random clusters.
    kn = len(nonempty)
    full = num_draws // kn * kn
    last = np.sort(rng.choice(kn, num_draws - full, replace=False))
    base, size = starts[nonempty], sizes[nonempty]
    positions = range(rank, num_draws, world)
    draws = np.empty(len(positions), dtype=LABEL_DTYPE)
    for s in range(0, len(positions), CHUNK):
        p = np.arange(positions[s], positions[min(s + CHUNK, len(positions)) - 1] + 1, world)
        f = permuted(p, num_draws, seed, SALT_DRAWS)
        slot = f % kn
        tail = f >= full
        slot[tail] = last[f[tail] - full]
        draws[s : s + len(p)] = members[base[slot] + (f // kn) % size[slot]]
    return draws


def uniform_cluster_sampler_v1(labels: np.ndarray, num_draws: int, seed: int) -> np.ndarray:
    """Sampler version 1, kept so that a run started with it continues bit-exactly: the same
    distribution, but six N-length int64 temporaries (keys, sort order, positions, draws)."""
    rng = np.random.default_rng(seed)
    labels = labels.astype(np.int64)
    keys = rng.random(len(labels))
    members = np.flatnonzero(labels >= 0)
    order = members[np.lexsort((keys[members], labels[members]))]
    sizes = np.bincount(labels[members])
    nonempty = np.flatnonzero(sizes)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))[nonempty]
    per = -(-num_draws // len(nonempty))
    j = np.arange(per)
    pos = starts[:, None] + j[None, :] % sizes[nonempty][:, None]
    draws = order[pos[rng.permutation(len(nonempty))].T.ravel()[:num_draws]]
    return draws[rng.permutation(len(draws))]


def rank_draws(
    version: int, labels: np.ndarray, num_draws: int, seed: int, rank: int, world: int,
    batch_size: int,
) -> np.ndarray:  # fmt: skip
    """This rank's share of the epoch's draws with sampler `version` (a run's is in its
    checkpoints), cut so that every rank takes the same number of steps."""
    if version == 1:
        return rank_slice(uniform_cluster_sampler_v1(labels, num_draws, seed), rank, world,
                          batch_size)  # fmt: skip
    mine = uniform_cluster_sampler(labels, num_draws, seed, rank, world)
    return mine[: _rank_rows(num_draws, world, batch_size)]


def rank_slice(draws: np.ndarray, rank: int, world: int, batch_size: int) -> np.ndarray:
    """This rank's share of all the draws, cut so every rank takes the same number of steps.

    Equal step counts are what keep DDP's all-reduces matched across ranks.
    """
    return np.ascontiguousarray(draws[rank::world][: _rank_rows(len(draws), world, batch_size)])


def _rank_rows(num_draws: int, world: int, batch_size: int) -> int:
    """The draws each rank takes: whole steps, as many on every rank."""
    return num_draws // (world * batch_size) * batch_size
