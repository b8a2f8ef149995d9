"""Seeded choices by global sample index: initial centroids, samples for PCA and for Lloyd's
iterations, coins. Each is a pure function of (index, seed, salt), so whichever holder has a
sample makes the same choice for it, and no choice depends on the number of ranks.
"""

from __future__ import annotations

import numpy as np

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose outputs look independent."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def sample_keys(index: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """A pseudo-random uint64 for each global sample index, a pure function of (index, seed,
    salt): whichever rank holds a sample computes the same key for it, so choices made by key
    (initial centroids, samples, coins) do not depend on the number of ranks."""
    base = np.array([seed & (2**64 - 1), salt & (2**64 - 1)], dtype=_U64)
    with np.errstate(over="ignore"):
        offset = _splitmix64(_splitmix64(base[:1] * _GOLDEN) + base[1:] * _GOLDEN)
        return _splitmix64(np.asarray(index).astype(_U64) * _GOLDEN + offset[0])


# Salts of the different choices made from one seed.
SALT_INIT, SALT_PCA, SALT_TRAIN, SALT_COIN, SALT_SPLIT = 1, 2, 3, 4, 5
SALT_MEMBERS, SALT_DRAWS = 6, 7

FEISTEL_ROUNDS = 4  # Luby-Rackoff: four rounds of a pseudo-random function give a strong PRP


def permuted(i: np.ndarray, n: int, seed: int, salt: int) -> np.ndarray:
    """pi(i) (int64) for a pseudo-random permutation pi of 0..n-1 keyed by (seed, salt).

    A balanced Feistel network on the smallest even number of bits that covers n, its round
    function splitmix64 keyed per round, walked again from any value >= n until it lands
    below n (a permutation of the larger domain restricted this way is one of 0..n-1; at most
    4n / n walks are expected). Any part of 0..n-1 maps on its own, in any order: nothing
    N-sized is held, and every rank computes the same pi for its own positions.
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask, shift = _U64((1 << half) - 1), _U64(half)
    round_keys = sample_keys(np.arange(FEISTEL_ROUNDS), seed, salt)
    out = np.asarray(i).astype(_U64)
    todo = np.arange(len(out))
    while len(todo):
        x = out[todo]
        left, right = x >> shift, x & mask
        for key in round_keys:
            left, right = right, left ^ (_splitmix64(right ^ key) & mask)
        out[todo] = (left << shift) | right
        todo = todo[out[todo] >= _U64(n)]
    return out.astype(np.int64)


def initial_indices(index: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The sample indices of the k initial centroids: the k smallest keys, in key order.

    A holder's candidates are its own k smallest, and the k smallest of the union of every
    holder's candidates are the global k smallest, whatever the number of holders.
    """
    index = np.unique(np.asarray(index, dtype=np.int64))
    keys = sample_keys(index, seed, SALT_INIT)
    return index[np.lexsort((index, keys))[:k]]


def rows_of(index: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in `wanted`, rows of `index`) of the wanted samples that `index` holds."""
    index, wanted = np.asarray(index, np.int64), np.asarray(wanted, np.int64)
    if not len(index):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(index, kind="stable")
    at = np.searchsorted(index, wanted, sorter=order).clip(0, len(index) - 1)
    found = np.flatnonzero(index[order[at]] == wanted)
    return found, order[at[found]]


def keep_fraction(index: np.ndarray, fraction: float, seed: int, salt: int) -> np.ndarray:
    """Mask of the samples whose key falls below `fraction` of the key range: a uniform sample
    of about fraction * N samples, chosen by index so that no holder's share matters."""
    if fraction >= 1.0:
        return np.ones(len(index), dtype=bool)
    return sample_keys(index, seed, salt) < _U64(int(fraction * 2.0**64))


def coin(index: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A fair coin per global sample index: splits duplicates the same way on any world size."""
    return (sample_keys(index, seed, SALT_COIN + (salt << 8)) >> _U64(63)).astype(bool)
