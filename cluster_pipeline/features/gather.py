"""The exactly-once feature gather, and the labels' way back to every rank.

    every rank's (sample index, features) ──gather_features──▶ rank 0's N x d matrix
        (and the check that each sample was extracted, or reported skipped, exactly once)
    rank 0's labels ──broadcast_labels──▶ every rank    (cluster.mode=gather)
    every rank's labels of its rows ──all_gather_labels──▶ every rank    (cluster.mode=sharded)

Built on the primitives of `dist` only; arrays travel as tensors, in bounded chunks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cluster_pipeline import dist
from cluster_pipeline.clustering.labels import LABEL_DTYPE, as_labels

log = logging.getLogger(__name__)

# Rows per message in `gather_features`: bounds the extra memory on rank 0 to one chunk.
GATHER_CHUNK_BYTES = 64 << 20
# Entries of the N-vector of labels per message in `broadcast_labels` and `all_gather_labels`
# (4 MiB of int32, 8 MiB of int64 sums): small, as what the allocator keeps of it stays resident.
LABEL_CHUNK = 1 << 20


@dataclass(frozen=True)
class Gathered:
    """Rank 0's features of one extraction: row j is sample `index[j]`.

    `index` and `skipped` are sorted and together are 0..N-1, each sample once: the samples
    left out are exactly those reported unreadable (data.on_error=skip), never fewer rows
    by accident. Without skips `index` is 0..N-1 and row i is sample i.
    """

    feats: np.ndarray  # (N - len(skipped), d) float32
    index: np.ndarray  # int64 sample indices of the rows
    skipped: np.ndarray  # int64 sample indices that could not be read

    @property
    def num_samples(self) -> int:
        return len(self.index) + len(self.skipped)

    def per_sample(self, values: np.ndarray, fill: int = -1) -> np.ndarray:
        """Per-row `values` spread over all N samples, `fill` at the skipped ones."""
        out = np.full(self.num_samples, fill, dtype=values.dtype)
        out[self.index] = values
        return out


class _Tally:
    """Rank 0's count of each sample's arrivals, as a row or as skipped, and the first error.

    Elsewhere it counts nothing. After an error nothing more is counted or written, but every
    message is still received, so that no rank is left waiting.
    """

    def __init__(self, ctx: dist.DistContext, num_samples: int) -> None:
        self.seen = np.zeros(num_samples if ctx.is_main else 0, dtype=np.int64)
        self.skip_seen: np.ndarray | None = None  # `seen` of the skipped samples alone
        self.rows: np.ndarray | None = None  # sample -> row of the result; None: row i is sample i
        self.bad: RuntimeError | None = None

    def count(self, index: np.ndarray, src: int) -> bool:
        """Count rank `src`'s sample indices; whether all is still well."""
        if self.bad is None:
            self.bad = _count_indices(self.seen, index, src)
        return self.bad is None

    def count_skipped(self, parts: list[np.ndarray]) -> None:
        """Count every rank's skipped samples, and number the rows of the others."""
        for src, part in enumerate(parts):
            self.count(part, src)
        self.skip_seen = self.seen.copy()
        self.rows = np.cumsum(self.seen == 0) - 1

    def dest(self, index: np.ndarray) -> np.ndarray:
        """The rows of the result that samples `index` go to."""
        return index if self.rows is None else self.rows[index]


def gather_features(
    ctx: dist.DistContext,
    index: np.ndarray,
    feats: np.ndarray,
    num_samples: int,
    skipped: np.ndarray | None = None,
) -> Gathered | None:
    """Gather every rank's (index, features) rows, and its `skipped` sample indices, on rank 0.

    Ranks may hold different counts, including none. Skipped indices travel first, so rank 0
    knows where each row goes; rows travel as tensors in chunks of GATHER_CHUNK_BYTES and are
    scattered into the preallocated result, so rank 0 peaks near one copy of the matrix.
    Raises on every rank unless each sample 0..num_samples-1 was extracted exactly once or
    skipped exactly once, by some rank. Returns None on ranks other than 0.
    Collective: call on every rank.
    """
    skipped = np.zeros(0, np.int64) if skipped is None else skipped
    counts, skips = _check_totals(ctx, len(index), len(skipped), num_samples)
    tally = _Tally(ctx, num_samples)
    if skips:  # where each row goes depends on which samples were skipped
        parts = dist.gather(ctx, np.asarray(skipped, dtype=np.int64))
        tally.count_skipped(parts or [])
    out = _place_own_rows(ctx, tally, index, feats)
    _receive_rows(ctx, tally, out, index, feats, counts)
    _agree_on_coverage(ctx, tally)
    if out is None:
        return None
    return _gathered(out, tally.skip_seen, num_samples)


def _check_totals(
    ctx: dist.DistContext, rows: int, skips: int, num_samples: int
) -> tuple[list[int], int]:
    """Rows per rank and skipped samples in all; raises on every rank unless they add up to N.

    Collective: call on every rank.
    """
    counts = dist.all_gather_counts(ctx, rows)
    skip_counts = dist.all_gather_counts(ctx, skips)
    if sum(counts) + sum(skip_counts) != num_samples:
        text = f" and skipped {sum(skip_counts)} (per rank {skip_counts})"
        raise RuntimeError(
            f"extraction produced {sum(counts)} rows (per rank {counts}) for {num_samples} "
            f"samples{text if any(skip_counts) else ''}"
        )
    return counts, sum(skip_counts)


def _place_own_rows(
    ctx: dist.DistContext, tally: _Tally, index: np.ndarray, feats: np.ndarray
) -> np.ndarray | None:
    """Rank 0's result matrix, with its own rows in place; None elsewhere."""
    if not ctx.is_main:
        return None
    out = np.empty((len(tally.seen) - int((tally.seen > 0).sum()), feats.shape[1]), np.float32)
    if tally.count(index, 0):
        out[tally.dest(index)] = feats
    return out


def _receive_rows(
    ctx: dist.DistContext,
    tally: _Tally,
    out: np.ndarray | None,
    index: np.ndarray,
    feats: np.ndarray,
    counts: list[int],
) -> None:
    """Each other rank's index, then its rows in chunks, into rank 0's `out`, rank by rank.

    Collective: call on every rank.
    """
    d = feats.shape[1]
    chunk_rows = max(1, GATHER_CHUNK_BYTES // max(1, 4 * d))
    for src in range(1, ctx.world):
        n = counts[src]
        if n == 0:
            continue
        if ctx.rank == src:
            dist.send(ctx, np.asarray(index, dtype=np.int64), dst=0)
            for s in range(0, n, chunk_rows):
                dist.send(ctx, np.asarray(feats[s : s + chunk_rows], dtype=np.float32), dst=0)
        elif out is not None:
            idx = dist.recv(ctx, (n,), np.int64, src)
            dest = tally.dest(idx) if tally.count(idx, src) else None
            for s in range(0, n, chunk_rows):
                m = min(chunk_rows, n - s)
                chunk = dist.recv(ctx, (m, d), np.float32, src)
                if dest is not None and tally.bad is None:  # after an error: received, dropped
                    out[dest[s : s + m]] = chunk


def _agree_on_coverage(ctx: dist.DistContext, tally: _Tally) -> None:
    """Rank 0's verdict on the exactly-once check, raised on every rank alike.

    Collective: call on every rank.
    """
    if ctx.is_main and tally.bad is None and not np.all(tally.seen == 1):
        tally.bad = _coverage_error(tally.seen, tally.skip_seen)
    failed = dist.broadcast(ctx, np.array([int(tally.bad is not None)], np.int64), (1,), np.int64)
    if tally.bad is not None:
        raise tally.bad
    if failed[0]:
        raise RuntimeError(
            "rank 0 found that extraction did not read every sample exactly once (or report it "
            "skipped once), or read indices outside 0..N-1; see logs/rank0.log"
        )


def _gathered(out: np.ndarray, skip_seen: np.ndarray | None, num_samples: int) -> Gathered:
    if skip_seen is None:
        return Gathered(out, np.arange(num_samples, dtype=np.int64), np.zeros(0, np.int64))
    lost = np.flatnonzero(skip_seen)
    log.warning("%d of %d samples could not be read and are left out (first: %s); the rank "
                "logs name each shard and reason", len(lost), num_samples,
                " ".join(f"{i:09d}" for i in lost[:5]))  # fmt: skip
    return Gathered(out, np.flatnonzero(skip_seen == 0), lost)


def _count_indices(seen: np.ndarray, index: np.ndarray, src: int) -> RuntimeError | None:
    """Add one rank's sample indices to `seen`, once per rank; out of 0..N-1 is an error."""
    if len(index) and (index.min() < 0 or index.max() >= len(seen)):
        return RuntimeError(
            f"rank {src} sent sample indices in [{index.min()}, {index.max()}], outside "
            f"0..{len(seen) - 1}; its shards do not match the index"
        )
    seen += np.bincount(index, minlength=len(seen))
    return None


def _coverage_error(seen: np.ndarray, skip_seen: np.ndarray | None) -> RuntimeError:
    """Which samples were not extracted-or-skipped exactly once, for rank 0's error."""
    missing, dup = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    msg = (
        f"extraction did not read every sample exactly once: {len(missing)} missing "
        f"(first {missing[:5].tolist()}), {len(dup)} duplicated (first {dup[:5].tolist()})"
    )
    if skip_seen is not None:
        both = np.flatnonzero((skip_seen > 0) & (seen > skip_seen))
        twice = np.flatnonzero(skip_seen > 1)
        msg += (
            f"; of these, {len(both)} both extracted and skipped (first {both[:5].tolist()}), "
            f"{len(twice)} skipped more than once (first {twice[:5].tolist()})"
        )
    return RuntimeError(msg)


def broadcast_labels(
    ctx: dist.DistContext, labels: np.ndarray | None, num_samples: int
) -> np.ndarray:
    """Rank 0's per-sample labels (int32, indexed by sample) on every rank; the others pass None.

    In chunks of LABEL_CHUNK entries, so no rank holds a second N-length copy in transit.
    Collective: call on every rank.
    """
    if not ctx.distributed:
        assert labels is not None
        return as_labels(labels)
    out = as_labels(labels) if labels is not None else np.empty(num_samples, LABEL_DTYPE)
    for s in range(0, num_samples, LABEL_CHUNK):
        n = min(LABEL_CHUNK, num_samples - s)
        part = out[s : s + n] if ctx.is_main else None
        out[s : s + n] = dist.broadcast(ctx, part, (n,), LABEL_DTYPE)
    return out


def all_gather_labels(
    ctx: dist.DistContext,
    index: np.ndarray,
    labels: np.ndarray,
    skipped: np.ndarray,
    num_samples: int,
) -> np.ndarray:
    """Every rank's per-row labels spread into one int32 N-vector by sample index, on every
    rank; the `skipped` samples get -1.

    Each rank adds 2**32 + label + 1 at its samples and 2**32 at its skipped ones to a zero
    N-vector, all-reduced in chunks of LABEL_CHUNK entries: the high half then counts how often
    each sample was seen, so this is also sharded mode's check that every sample was extracted
    or skipped exactly once, and it raises (on every rank alike) otherwise. Collective: call on
    every rank.
    """
    index = np.asarray(index, dtype=np.int64)
    skipped = np.sort(np.asarray(skipped, dtype=np.int64))
    outside = any(len(v) and (v.min() < 0 or v.max() >= num_samples) for v in (index, skipped))
    if dist.all_reduce(ctx, np.array([int(outside)], np.int64), "max")[0]:
        raise RuntimeError(
            f"sample indices outside 0..{num_samples - 1} were extracted"
            + (f" by rank {ctx.rank}" if outside else " by another rank; see its log")
        )
    # A rank's rows come in sample order (its rank_partition, read in order): then no sort,
    # and nothing N / world-sized beyond the caller's arrays is made.
    if len(index) > 1 and not np.all(index[1:] >= index[:-1]):
        order = np.argsort(index, kind="stable")
        index, labels = index[order], labels[order]
    out = np.empty(num_samples, dtype=LABEL_DTYPE)
    missing = duplicated = 0
    first_bad: list[int] = []
    for s in range(0, num_samples, LABEL_CHUNK):
        n = min(LABEL_CHUNK, num_samples - s)
        lo, hi = np.searchsorted(index, [s, s + n])
        pos = index[lo:hi] - s
        slo, shi = np.searchsorted(skipped, [s, s + n])
        counts = np.bincount(pos, minlength=n) + np.bincount(skipped[slo:shi] - s, minlength=n)
        chunk = counts.astype(np.int64) << 32
        chunk[pos] += labels[lo:hi].astype(np.int64) + 1
        chunk = dist.all_reduce(ctx, chunk)
        hits = chunk >> 32
        out[s : s + n] = (chunk & 0xFFFFFFFF) - 1
        missing += int((hits == 0).sum())
        duplicated += int((hits > 1).sum())
        if len(first_bad) < 5:
            first_bad += (np.flatnonzero(hits != 1)[: 5 - len(first_bad)] + s).tolist()
    if missing or duplicated:
        raise RuntimeError(
            f"extraction did not read every sample exactly once: {missing} missing, "
            f"{duplicated} duplicated (first {first_bad})"
        )
    return out
