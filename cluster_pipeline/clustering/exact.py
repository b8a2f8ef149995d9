"""Exact arithmetic on float arrays: matrix products and sums whose bits are a function of the
values alone, not of the BLAS, its kernels or threads, the summation order or the memory
alignment (the reason: see `kmeans`).

- `exact_matmul`: a product of operands rounded to fixed-point integers in float64, which any
  kernel sums to the same bits;
- `to_fixed_point` / `cluster_sums`: per-cluster sums of fixed-point integers, exact in any
  order and so over any number of holders;
- `squared_distances`: float64, row by row, each row's bits its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rows per float64 block of the exact products, the search and the sums: about 64 MiB each.
BLOCK_BYTES = 64 << 20
# float64 represents every integer of magnitude up to 2**53 exactly.
FLOAT64_INT_BITS = 53


def block_rows(width: int) -> int:
    """Rows of a float64 block of `width` columns that fit BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (8 * max(1, width)))


# --------------------------------------------------------------------- exact matrix products


def power_of_two_scale(max_abs: np.ndarray | float, bits: int) -> np.ndarray:
    """2**(bits - e) for max_abs < 2**e: values up to max_abs, times it, stay below 2**bits."""
    _, e = np.frexp(np.asarray(max_abs, dtype=np.float64))
    return np.ldexp(1.0, bits - e)


def exact_bits(inner: int) -> tuple[int, int]:
    """(A, B): integer bits of `exact_matmul`'s two operands for `inner` summed products, with
    A + B + ceil(log2(inner)) = 53, so that no partial sum exceeds 2**53."""
    budget = FLOAT64_INT_BITS - max(1, int(np.ceil(np.log2(max(inner, 2)))))
    return budget // 2, budget - budget // 2


def exact_matmul(a: np.ndarray, b: np.ndarray | FixedColumns) -> np.ndarray:
    """a @ b in float64, with each row of `a` and each column of `b` rounded to fixed point.

    Each row of `a` is scaled by a power of two to integers of A bits and each column of `b` to
    integers of B bits, with A + B + log2(inner dimension) <= 53: every product and partial sum
    is then an integer float64 holds exactly, and any BLAS, kernel, thread count or summation
    order gives the same bits. Row i of the result depends on row i of `a` and on `b` only.
    The rounding moves an entry by at most 2**-A of its row's largest magnitude (2**-B of its
    column's): A + B is 41 for 4096 inner terms, about float32's accumulated error there.
    `b` may come rounded already (`FixedColumns`), for many blocks of rows against one matrix.
    """
    cols = b if isinstance(b, FixedColumns) else FixedColumns.of(b)
    # Rounded in float32 when `a` is float32: a power-of-two scaling is exact there too, and the
    # integers come out the same; the float64 copy is made once, of the integers.
    aq: np.ndarray = np.array(a, dtype=np.float32 if a.dtype == np.float32 else np.float64)
    top = np.maximum(aq.max(axis=1, initial=0.0), -aq.min(axis=1, initial=0.0))
    # (capped for float32's range: a row below 2**-100 of its scale rounds to zeros anyway)
    a_scale = np.minimum(power_of_two_scale(top, cols.row_bits), 2.0**100).astype(aq.dtype)
    a_scale = a_scale[:, None]
    aq *= a_scale
    np.rint(aq, out=aq)
    out = aq.astype(np.float64) @ cols.values
    out /= a_scale  # powers of two: exact
    out /= cols.scale
    return out


@dataclass(frozen=True)
class FixedColumns:
    """The right operand of `exact_matmul`, its columns rounded to B-bit integers."""

    values: np.ndarray  # (m, p) float64 integers
    scale: np.ndarray  # (p,) powers of two: values = rint(b * scale)
    row_bits: int  # A, the bits left for the rows of the left operand

    @classmethod
    def of(cls, b: np.ndarray) -> FixedColumns:
        a_bits, b_bits = exact_bits(b.shape[0])
        b64 = np.asarray(b, dtype=np.float64)
        scale = power_of_two_scale(np.abs(b64).max(axis=0, initial=0.0), b_bits)
        return cls(np.rint(b64 * scale), scale, a_bits)


# ------------------------------------------------------------------ exact fixed-point sums


def fixed_point_scale(max_abs: float, num_points: int) -> float:
    """The power of two by which values up to `max_abs` are scaled to integers so that a sum
    of `num_points` of them stays below 2**52: exact in float64 (bincount) and in int64.

    Integer sums do not depend on their order, so per-cluster sums over any number of ranks
    are bit-identical. At N = 1.28M and |x| <= 1 (L2) the resolution is 2**-31; at N = 1e9,
    2**-22, still far below what moves a centroid of 1e9 / k points.
    """
    bits = 52 - int(np.ceil(np.log2(max(num_points, 1) + 1)))
    bits -= int(np.ceil(np.log2(max_abs))) if max_abs > 0 else 0
    return float(2.0 ** min(bits, 60))


def to_fixed_point(x: np.ndarray, scale: float) -> np.ndarray:
    """Rows times `scale`, rounded: integers in float64, column-major for `cluster_sums`."""
    q = np.empty(x.shape, dtype=np.float64, order="F")
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        part = np.multiply(x[s : s + step], scale, dtype=np.float64)
        q[s : s + step] = np.rint(part, out=part)
    return q


def cluster_sums(q: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (int64) of fixed-point rows `q` (`to_fixed_point`) and the counts.

    One bincount per column: exact, since every partial sum is an integer below 2**53.
    """
    q = np.asfortranarray(q)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    sums = np.empty((k, q.shape[1]), dtype=np.int64)
    for j, column in enumerate(q.T):
        sums[:, j] = np.bincount(labels, weights=column, minlength=k)
    return sums, counts


def fixed_point_sums(
    x: np.ndarray, labels: np.ndarray, k: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """`cluster_sums` of `to_fixed_point(x, scale)`, a block of rows at a time (no N x d
    float64 copy)."""
    sums = np.zeros((k, x.shape[1]), dtype=np.int64)
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        sums += cluster_sums(to_fixed_point(x[s : s + step], scale), labels[s : s + step], k)[0]
    return sums, np.bincount(labels, minlength=k).astype(np.int64)


def centroids_from_sums(
    sums: np.ndarray,
    counts: np.ndarray,
    scale: float,
    previous: np.ndarray,
    spherical: bool = False,
) -> np.ndarray:
    """Means of the clusters from their global sums; an empty cluster keeps its centroid.
    `spherical`: the means scaled to unit length (spherical k-means: on unit points, the
    nearest unit centroid is the one of largest dot product)."""
    out = previous.astype(np.float32, copy=True)
    full = counts > 0
    means = sums[full].astype(np.float64) / scale / counts[full, None]
    out[full] = (unit_rows(means) if spherical else means).astype(np.float32)
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length in float64 (a zero row stays zero), row by row alike."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.square(x).sum(axis=1, keepdims=True))
    return x / np.where(norms > 0, norms, 1.0)


# -------------------------------------------------------------------------- squared distances


def squared_distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each point's squared L2 distance to its own centroid, float64, one row at a time (a
    row's sum runs over its d values in a fixed order, so its bits depend on that row only)."""
    out = np.empty(len(x), dtype=np.float64)
    step = block_rows(x.shape[1])
    for s in range(0, len(x), step):
        diff = x[s : s + step].astype(np.float64) - centroids[labels[s : s + step]]
        out[s : s + len(diff)] = np.square(diff, out=diff).sum(axis=1)
    return out


def squared_distance_sum(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """The k-means objective summed over points."""
    return float(squared_distances(x, centroids, labels).sum())
