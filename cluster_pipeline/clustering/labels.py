"""N-length label vectors: their dtype, and counting them in bounded memory.

Labels (pseudo-labels, classes, assignments) are int32 wherever they are held, sent or saved:
at 1B samples an int64 vector is 8 GB on every rank, an int32 one 4 GB. -1 marks a sample in
no cluster (skipped as unreadable). Work over a whole vector goes in chunks of `CHUNK`
entries, so a temporary is chunk-sized, not N-sized: `np.bincount` alone would copy an int32
vector to int64 first.
"""

from __future__ import annotations

import numpy as np

LABEL_DTYPE = np.int32
CHUNK = 1 << 20  # entries per chunk: 4 MiB of labels, 8 MiB of int64 temporaries


def as_labels(labels: np.ndarray) -> np.ndarray:
    """`labels` as a contiguous int32 vector (no copy when it already is one)."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < -1 or labels.max() > np.iinfo(LABEL_DTYPE).max):
        raise ValueError(f"labels outside -1..2**31-1: {labels.min()}..{labels.max()}")
    return np.ascontiguousarray(labels, dtype=LABEL_DTYPE)


def label_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """How many samples carry each label >= 0 (int64, at least `minlength` long); -1 is not
    counted."""
    n = max(minlength, int(labels.max()) + 1 if len(labels) else 0)
    counts = np.zeros(n, dtype=np.int64)
    for s in range(0, len(labels), CHUNK):
        part = labels[s : s + CHUNK]
        counts += np.bincount(part[part >= 0], minlength=n)
    return counts
